"""``hil runs``: the run folders under a directory, with their kind, status, task and result."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
from pathlib import Path
from typing import Any

import yaml

from hil.errors import ConfigError
from hil.runs import default_root, pid_alive, read_status

_STAMP = re.compile(r"^(\d{8}-\d{6})-(.+?)(?:-\d+)?$")
#: kinds of run folder the commands make, longest first (a folder's name is <stamp>-<kind>[-<name>])
KINDS = ("train-in-the-loop", "calibrate-reference", "position-optimise", "source-calibrate",
         "study-mismatch", "chain-measure", "chain-design", "conv-deploy", "tune-report",
         "conv-train", "upload", "train", "tune")


def register(sub: Any) -> None:
    p = sub.add_parser("runs", help="list the run folders under a directory, with their status",
                       description="List the run folders under DIR (default: $HIL_RUNS or ./runs), "
                       "newest first: kind, status (running, complete, failed, interrupted; "
                       "'unknown' for folders written before status.json), task, result and date.")
    p.add_argument("dir", nargs="?", default=None, metavar="DIR",
                   help="parent folder of run folders (default: $HIL_RUNS or ./runs)")
    p.set_defaults(func=run)


def _read(path: Path, loader: Any) -> Any:
    try:
        return loader(path.read_text())
    except (OSError, ValueError, yaml.YAMLError, UnicodeDecodeError):
        return None


def _kind(name: str, status: dict[str, Any]) -> str:
    if status.get("kind"):
        return str(status["kind"])
    m = _STAMP.match(name)
    rest = m.group(2) if m else name
    return next((k for k in KINDS if rest == k or rest.startswith(k + "-")), "?")


def _date(name: str, status: dict[str, Any], env: Any) -> str:
    when = status.get("started") or (env.get("created") if isinstance(env, dict) else None)
    if when:
        return str(when).replace("T", " ")[:16]
    m = _STAMP.match(name)
    if m:
        return _dt.datetime.strptime(m.group(1), "%Y%m%d-%H%M%S").strftime("%Y-%m-%d %H:%M")
    return ""


def _result(path: Path) -> tuple[str | None, str]:
    """(task, result) from the folder's summary."""
    for name in ("summary.json", "tune_summary.json"):
        s = _read(path / name, json.loads)
        if not isinstance(s, dict):
            continue
        task = s.get("task")
        metric = s.get("metric", "")
        for key in ("test", "test_on_device", "device"):
            block = s.get(key)
            if isinstance(block, dict) and block.get("median") is not None:
                return task, f"{key} {metric} median {100 * block['median']:.2f} % (n={block.get('n')})"
            if isinstance(block, dict) and block.get("n") == 0:
                return task, f"{key} {metric}: no seed succeeded"
        if s.get("best_value") is not None:
            return task, f"best trial {s.get('best_trial')}: {s['best_value']:.4f}"
        if isinstance(s.get("trials"), dict):
            return task, f"{s['trials'].get('complete', 0)} trials complete"
    return None, ""


def list_runs(root: Path) -> list[dict[str, Any]]:
    """One row per run folder (a folder with status.json or environment.json) under ``root``."""
    rows = []
    for path in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True):
        status = read_status(path)
        env = _read(path / "environment.json", json.loads)
        if not status and env is None:
            continue  # not a run folder
        task, result = _result(path)
        if task is None:
            cfg = _read(path / "config.yaml", yaml.safe_load)
            if isinstance(cfg, dict) and isinstance(cfg.get("task"), dict):
                task = cfg["task"].get("name")
        state = status.get("status", "unknown")
        if state == "running" and status.get("pid") and not pid_alive(int(status["pid"])):
            state = "running?"  # the process that wrote it is gone (killed without a chance to say)
        rows.append({"folder": path.name, "kind": _kind(path.name, status), "status": state,
                     "reason": status.get("reason", ""), "task": task or "", "result": result,
                     "date": _date(path.name, status, env)})
    return rows



def format_table(rows: list[dict[str, Any]]) -> str:
    cols = ("date", "kind", "status", "task", "result", "folder")
    widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols).rstrip()]
    for r in rows:
        lines.append("  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip())
        if r["reason"] and r["status"] != "complete":
            lines.append(" " * (widths["date"] + 2) + f"reason: {r['reason']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir) if args.dir else default_root()
    if not root.is_dir():
        raise ConfigError("DIR", f"{root} is not a folder (run folders are made under $HIL_RUNS "
                          "or ./runs, or --runs-dir)", "command line")
    rows = list_runs(root)
    if not rows:
        print(f"no run folders under {root}")
        return 0
    print(format_table(rows))
    return 0
