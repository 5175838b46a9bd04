"""Run folders: every run writes its config, environment, instrument IDNs, metrics and plots."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import yaml

#: called with every RunFolder opened (created or resumed) while registered; see add_folder_hook
_folder_hooks: list[Callable[[RunFolder], None]] = []


class MetricsSink(Protocol):
    """Receives every record appended to a run folder's ``metrics.jsonl`` (e.g. TensorBoard)."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def add_folder_hook(hook: Callable[[RunFolder], None]) -> Callable[[], None]:
    """Call ``hook(folder)`` for every RunFolder opened from now on; returns its remover.

    The command line uses it to give each run folder a log file and the metrics viewers asked for
    (``--log tensorboard``), whichever command opens the folder.
    """
    _folder_hooks.append(hook)

    def remove() -> None:
        if hook in _folder_hooks:
            _folder_hooks.remove(hook)

    return remove


def redact_secrets(text: str) -> str:
    """Hide the password of any ``scheme://user:password@host`` URL in ``text``."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def default_root() -> Path:
    """Parent of run folders: ``$HIL_RUNS`` or ``./runs``."""
    return Path(os.environ.get("HIL_RUNS", "runs"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class RunFolder:
    """A folder holding everything needed to understand and reproduce one run.

    Files: ``config.yaml`` (resolved config), ``environment.json`` (versions, command line,
    git commit), ``instruments.json`` (IDNs, when instruments are used), ``metrics.jsonl``
    (appended as produced, so a crash loses nothing already measured), plus plots and
    result files written by the job.
    """

    def __init__(self, path: Path, sinks: list[MetricsSink] | None = None) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.sinks: list[MetricsSink] = list(sinks or [])
        for hook in list(_folder_hooks):
            hook(self)

    @classmethod
    def create(cls, kind: str, root: Path | str | None = None, name: str | None = None) -> RunFolder:
        """Make a new, uniquely named folder ``<root>/<timestamp>-<kind>[-<name>]``."""
        root = Path(root) if root is not None else default_root()
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = f"{stamp}-{_slug(kind)}" + (f"-{_slug(name)}" if name else "")
        path = root / base
        i = 1
        while path.exists():
            i += 1
            path = root / f"{base}-{i}"
        folder = cls(path)
        folder.write_environment()
        return folder

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: dict[str, Any], name: str = "config.yaml") -> Path:
        p = self.file(name)
        p.write_text(yaml.safe_dump(config, sort_keys=False))
        return p

    def write_json(self, name: str, data: Any) -> Path:
        p = self.file(name)
        p.write_text(json.dumps(data, indent=2, default=_jsonable))
        return p

    def append_metrics(self, record: dict[str, Any], name: str = "metrics.jsonl") -> None:
        """Append one record and flush it to disk at once; ``metrics.jsonl`` records also go to
        the folder's sinks (metrics viewers)."""
        with open(self.file(name), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=_jsonable) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if name == "metrics.jsonl":
            for sink in self.sinks:
                sink.write(record)

    def close_sinks(self) -> None:
        """Flush and close the metrics sinks (idempotent)."""
        for sink in self.sinks:
            sink.close()

    def read_metrics(self, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
        p = self.file(name)
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def write_environment(self) -> Path:
        import numpy
        import torch

        env = {
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "argv": [redact_secrets(a) for a in sys.argv],
            "python": sys.version,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "git_commit": _git_commit(),
            "cpu_threads": torch.get_num_threads(),
        }
        return self.write_json("environment.json", env)

    def __str__(self) -> str:
        return str(self.path)


def _jsonable(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)
