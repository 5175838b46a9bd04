"""Merge the curves of several ``hil study budget`` run folders on the same chips (same preset,
seeds, level and ideal weights, e.g. runs started with ``--init`` from the first) into one table
and one plot. Reads each folder's ``metrics.jsonl``, so a study stopped before its end still
contributes the estimators it finished.

    python scripts/merge_budget_studies.py OUT_DIR STUDY_FOLDER [STUDY_FOLDER ...]

The ideal model's per-seed accuracy is recomputed from the first folder's ``model.pt``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from hil import plots
from hil.chip.budget_study import budget_table, table_markdown
from hil.chip.study import evaluate_model
from hil.runs import RunFolder
from hil.training.checkpoints import load_run
from hil.training.train import summarize


def _last_point(pts: list[dict], seed: int) -> dict:
    """A seed's last point, the study's final figure (ties, a curve point and the epoch's end
    measured at the same weights, go to the later record, as in the study's own table)."""
    return max((p["train_device_time_s"], p["update"], i, p) for i, p in enumerate(pts)
               if p["seed"] == seed)[-1]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, folders = Path(argv[0]), [Path(a) for a in argv[1:]]
    torch.set_num_threads(1)
    cfg, task, net = load_run(folders[0])
    metric = task.metric_name
    ideal = [evaluate_model(net, k, task)["metric"] for k in range(net.K)]
    seeds = list(net.seeds)
    curves: dict[str, list[dict]] = defaultdict(list)
    for f in folders:  # an estimator run in several folders: the first folder's curve
        seen = set(curves)
        for line in (f / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["estimator"] not in seen:
                curves[rec["estimator"]].append(rec)
    curves = {e: pts for e, pts in curves.items() if {p["seed"] for p in pts} == set(seeds)}
    finals = {e: [_last_point(pts, s) for s in seeds] for e, pts in curves.items()}
    table = budget_table(curves, finals, ideal, seeds, metric, 0.01)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Merged budget studies ({', '.join(f.name for f in folders)}); ideal median "
             f"{100 * summarize(ideal)['median']:.2f} %, per seed "
             f"{', '.join(f'{100 * a:.1f}' for a in ideal)}", "",
             *table_markdown(table, metric)]
    (out / "budget_merged.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    RunFolder(out).write_json("budget_merged.json", {"ideal": ideal, "table": table,
                                                      "folders": [str(f) for f in folders]})
    plots.device_time_curves(curves, metric, out / "budget_merged.png", reference=summarize(ideal)["median"],
                             title=f"{cfg.task.name}: accuracy vs device time ({len(seeds)} seeds)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
