"""``hil design``: the paper's design rules (eq. 9-11) for a config or a trained run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hil.commands.train import add_config_args, resolve_config


def register(sub: Any) -> None:
    p = sub.add_parser("design", help="relaxation time vs input step and cumulative drive "
                       "I*dt (paper eq. 9-11), with warnings")
    add_config_args(p)
    p.add_argument("--run", dest="run_folder", help="check a trained run's weights instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hil.network import design_rules
    from hil.training.convergence import step_error

    if args.run_folder:
        from hil.training.checkpoints import load_run

        cfg, task, net = load_run(Path(args.run_folder))
        report = design_rules.check(cfg.model, net.layer_weights(0))
    else:
        cfg = resolve_config(args, default_preset="digits")
        from hil.network.model import DynamicalNetwork
        from hil.network.tasks import make_task

        task = make_task(cfg.task, cfg.train.output_gain)
        net = DynamicalNetwork([cfg.model], task.n_in, task.n_out, [cfg.seeds[0]],
                               task.input_centre)
        report = design_rules.check(cfg.model, net.layer_weights(0))
        report["note"] = "weights at initialisation; pass --run to check trained weights"
    # the integrator's own error on the task's first test inputs, against a converged solution
    report["step_error"] = step_error(net, task.splits["test"].x[:64])
    print(json.dumps(report, indent=2))
    for w in report["warnings"]:
        print(f"warning: {w}")
    return 0
