"""Run folders: every run writes its config, environment, instrument IDNs, metrics and plots."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import yaml

from hil.errors import HilError

#: the states of a run folder, recorded in its ``status.json``
STATUSES = ("running", "complete", "failed", "interrupted")
STATUS_FILE = "status.json"
#: files a run folder holds before its work starts: a folder with nothing else is empty
BOOKKEEPING = frozenset({STATUS_FILE, "environment.json", "hil.log", "config.yaml",
                         "search_space.json", "source.json", "tensorboard"})

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


_URL_PASSWORD = re.compile(r"(://[^:/@\s\"']*:)[^\s/\"']*@")
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pwd)=)[^&\s\"']*", re.IGNORECASE)


def redact_secrets(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL (and of a
    ``?password=`` query) replaced by ``***``: the one helper for everything hil prints, logs or
    stores (``environment.json``, ``config.yaml``, ``hil.log``, error messages).

    ``postgresql://user:pa@ss@host/db`` -> ``postgresql://user:***@host/db`` (a password may
    hold ``@``; the host is what follows the last one).
    """
    text = _URL_PASSWORD.sub(r"\1***@", text)
    return _QUERY_PASSWORD.sub(r"\1***", text)


def redact_data(obj: Any) -> Any:
    """``obj`` (nested dicts, lists, tuples) with :func:`redact_secrets` applied to every string."""
    if isinstance(obj, str):
        return redact_secrets(obj)
    if isinstance(obj, dict):
        return {k: redact_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_data(v) for v in obj)
    return obj


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (nested in dicts and lists) replaced by None, so
    that it is valid JSON (``null``) rather than a bare ``NaN``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    try:
        import numpy as np

        if isinstance(obj, np.floating):
            return float(obj) if np.isfinite(obj) else None
        if isinstance(obj, np.ndarray) and obj.dtype.kind == "f":
            return finite_or_none(obj.tolist())
    except ImportError:  # pragma: no cover
        pass
    return obj


def to_json(data: Any, indent: int | None = 2) -> str:
    """Valid JSON (non-finite numbers as ``null``, secrets redacted)."""
    return json.dumps(redact_data(finite_or_none(data)), indent=indent, default=_jsonable,
                      allow_nan=False)


# ----------------------------------------------------------------------------- atomic files

def _write_failed(path: Path, exc: OSError) -> HilError:
    why = exc.strerror or str(exc)
    kept = "the previous version is kept" if path.exists() else "nothing was written"
    return HilError(f"cannot write {path}: {why} ({kept}); free some space or choose another "
                    "--runs-dir")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder (same suffix) for a writer that takes a path
    (``torch.save``, ``savefig``); on success it is flushed to disk and renamed over ``path``
    in one step, so ``path`` is either the old file or the whole new one, never a truncated
    one. An ``OSError`` (full disk, ...) becomes a :class:`HilError` naming the file."""
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}",
                                        dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_failed(path, exc) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_failed(path, exc) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename); see :func:`atomic_path`."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)  # atomic_path fsyncs it before the rename
    return path


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """``fig.savefig`` through a temporary file (see :func:`atomic_path`)."""
    path = Path(path)
    fmt = kwargs.pop("format", None) or path.suffix.lstrip(".") or None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)
    return path


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

    def __init__(self, path: Path, sinks: list[MetricsSink] | None = None, *, created: bool = False) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.sinks: list[MetricsSink] = list(sinks or [])
        self.created = created  # True when RunFolder.create made it (not a resumed folder)
        for hook in list(_folder_hooks):
            hook(self)

    @classmethod
    def create(cls, kind: str, root: Path | str | None = None, name: str | None = None) -> RunFolder:
        """Make a new, uniquely named folder ``<root>/<timestamp>-<kind>[-<name>]``; its
        ``status.json`` says ``running`` until the command ends (see :meth:`set_status`)."""
        root = Path(root) if root is not None else default_root()
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = f"{stamp}-{_slug(kind)}" + (f"-{_slug(name)}" if name else "")
        path = root / base
        i = 1
        while path.exists():
            i += 1
            path = root / f"{base}-{i}"
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise HilError(f"cannot create the run folder {path}: {exc.strerror or exc}") from None
        folder = cls(path, created=True)
        folder.set_status("running", kind=kind)
        folder.write_environment()
        return folder

    def file(self, name: str) -> Path:
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        """Write a text file of the folder atomically (secrets redacted)."""
        return atomic_write(self.file(name), redact_secrets(text))

    def write_config(self, config: dict[str, Any], name: str = "config.yaml") -> Path:
        return atomic_write(self.file(name), yaml.safe_dump(redact_data(config), sort_keys=False))

    def update_environment(self, **entries: Any) -> Path:
        """Add or replace top-level entries of ``environment.json`` (e.g. the engine a job runs,
        known once its config is: ``hil.network.engine.record_engine``)."""
        env = self.file("environment.json")
        data = json.loads(env.read_text()) if env.exists() else {}
        data.update(entries)
        return self.write_json("environment.json", data)

    def write_json(self, name: str, data: Any) -> Path:
        """Write ``data`` as JSON atomically: non-finite numbers as ``null``, secrets redacted."""
        return atomic_write(self.file(name), to_json(data))

    def save_torch(self, name: str, obj: Any) -> Path:
        """``torch.save`` atomically (see :func:`atomic_path`)."""
        import torch

        with atomic_path(self.file(name)) as tmp:
            torch.save(obj, tmp)
        return self.file(name)

    def append_metrics(self, record: dict[str, Any], name: str = "metrics.jsonl") -> None:
        """Append one record and flush it to disk at once; ``metrics.jsonl`` records also go to
        the folder's sinks (metrics viewers). Every line is valid JSON: a non-finite value (a
        diverged epoch's loss) is written as ``null``."""
        line = to_json(record, indent=None) + "\n"
        path = self.file(name)
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise HilError(f"cannot append to {path}: {exc.strerror or exc} (the lines already "
                           "written are kept)") from None
        if name == "metrics.jsonl":
            for sink in self.sinks:
                sink.write(record)

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        """The folder's ``status.json`` (empty if it has none, e.g. an old folder)."""
        return read_status(self.path)

    def set_status(self, status: str, reason: str | None = None, **extra: Any) -> Path:
        """Record ``status`` (``running``, ``complete``, ``failed`` or ``interrupted``, with a
        ``reason`` for the last two) in ``status.json``, atomically; earlier fields are kept."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; allowed: {', '.join(STATUSES)}")
        now = _dt.datetime.now().isoformat(timespec="seconds")
        data = {**self.status(), **extra, "status": status, "updated": now}
        data.setdefault("started", now)
        if status == "running":
            data.pop("reason", None)
            data.pop("finished", None)
            data["pid"] = os.getpid()
        else:
            data["finished"] = now
            data.pop("pid", None)
            if reason:
                data["reason"] = reason
            else:
                data.pop("reason", None)
        return self.write_json(STATUS_FILE, data)

    def is_empty(self) -> bool:
        """Nothing but the files every folder gets before its work starts (see BOOKKEEPING)."""
        return all(p.name in BOOKKEEPING or (p.name.startswith(".") and ".tmp" in p.name)
                   for p in self.path.iterdir())

    def remove_if_empty(self) -> bool:
        """Delete a folder this run created when its work never started (validation failed)."""
        if not self.created or not self.path.is_dir() or not self.is_empty():
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return not self.path.exists()

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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 checks without sending anything);
    a process of another user counts as alive. ``pid <= 0`` names no single process: False."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: another user's process
        return True
    return True


def read_status(path: str | Path) -> dict[str, Any]:
    """``status.json`` of the run folder at ``path``; ``{}`` when absent or unreadable."""
    try:
        data = json.loads((Path(path) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def tracked(folders: list[RunFolder]) -> Iterator[list[RunFolder]]:
    """Give ``folders`` (filled while the block runs: every RunFolder opened meanwhile is added)
    their final status: ``complete``, ``failed`` (an exception, with its message) or
    ``interrupted`` (Ctrl-C, SIGTERM). A folder created in the block whose work never started
    (e.g. a value refused after it was made) is removed on a :class:`HilError`."""
    def add(folder: RunFolder) -> None:
        folders.append(folder)
        if not folder.created:
            folder.set_status("running")

    remove = add_folder_hook(add)
    try:
        yield folders
    except HilError as exc:
        finish(folders, "failed", str(exc), cleanup=True)
        raise
    except KeyboardInterrupt as exc:
        finish(folders, "interrupted", str(exc) or "interrupted (Ctrl-C)")
        raise
    except BaseException as exc:
        finish(folders, "failed", f"{type(exc).__name__}: {exc}")
        raise
    else:
        finish(folders, "complete")
    finally:
        remove()


def finish(folders: list[RunFolder], status: str, reason: str | None = None,
           cleanup: bool = False) -> None:
    """Set the final status of ``folders``; with ``cleanup``, remove those left empty."""
    for folder in folders:
        if not folder.path.is_dir():
            continue
        if cleanup and folder.remove_if_empty():
            continue
        if folder.status().get("status") in (None, "running"):
            with contextlib.suppress(HilError):  # a full disk must not hide the first error
                folder.set_status(status, reason)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint (``model.pt``) safely: ``torch.load(weights_only=True)`` reads tensors
    and plain data only, never running code a crafted file carries. An unreadable file, or one
    that needs pickled Python objects (a foreign or very old file), is a :class:`HilError`
    naming it."""
    import pickle

    import torch

    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if not found:  # not a pickle torch knows: damaged or not a checkpoint at all
            raise HilError(f"{path}: not a readable checkpoint, truncated or corrupt "
                           "(not a torch file)") from None
        raise HilError(f"{path}: refused: it holds Python objects ({found.group(1)}) that a safe "
                       "load does not run; only checkpoints of tensors and plain data load "
                       "(re-create it with this version of hil, from a source you trust)") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways (struct.error, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HilError(f"{path}: not a readable checkpoint, truncated or corrupt ({first[:160]})") from None
    if not isinstance(ckpt, dict):
        raise HilError(f"{path}: not a hil checkpoint (expected a mapping, got {type(ckpt).__name__})")
    return ckpt


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
