"""Safe on every ending: SIGTERM in the middle of a sweep leaves the bench as Ctrl-C does.

A real ``hil calibrate reference`` runs on the virtual lab in a subprocess that records every
instrument exchange; once its RF has been switched on, it gets SIGTERM. The recorded session
must end with RF off (read back as off), the DC source off, and every instrument closed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import sims

ROOT = Path(sims.__file__).resolve().parent.parent
LAB = ROOT / "lab_configs" / "virtual.yaml"


def _entries(log: Path) -> list[dict]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def _start_sweep(runs: Path) -> subprocess.Popen:
    env = {**os.environ, "HIL_RUNS": str(runs)}
    # a fine grid: minutes of sweep, so the signal surely lands in the middle of it
    return subprocess.Popen([sys.executable, "-m", "hil.cli", "calibrate", "reference", str(LAB),
                             "--reference-sample", "--z-step", "0.05", "--f-step", "10e6"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_rf_on(runs: Path, proc: subprocess.Popen, timeout_s: float = 60.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for log in runs.glob("*/instrument_io.jsonl"):
            if '"command": "OUTP ON"' in log.read_text():
                return log
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the sweep never switched the RF on")


def _signal_mid_sweep(tmp_path: Path, sig: signal.Signals) -> tuple[int, str, Path]:
    """Start the sweep, send ``sig`` once RF is on; (exit code, stderr, instrument log)."""
    runs = tmp_path / "runs"
    proc = _start_sweep(runs)
    try:
        log = _wait_for_rf_on(runs, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, log


def test_sigterm_mid_sweep_switches_rf_off_and_closes_everything(tmp_path):
    rc, err, log = _signal_mid_sweep(tmp_path, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err
    assert "SIGTERM; instruments made safe" in err
    entries = _entries(log)
    opened = {e["instrument"] for e in entries}
    closed = [e["instrument"] for e in entries if e["op"] == "close"]
    assert sorted(closed) == sorted(opened), "every instrument closed once"
    last = {}
    for e in entries:
        last.setdefault(e["instrument"], []).append(e)
    for name, seq in last.items():
        assert seq[-1]["op"] == "close", f"{name}: something was sent after close"
    rf_writes = [e["command"] for e in last["smb"] if e["command"].startswith("OUTP")]
    assert rf_writes[-2:] == ["OUTP OFF", "OUTP?"], rf_writes[-4:]
    assert [e["reply"] for e in last["smb"] if e["command"] == "OUTP?"][-1] == "0"
    assert "OUTP OFF" in [e["command"] for e in last["smu"]]


def test_sighup_takes_the_same_path(tmp_path):
    rc, err, log = _signal_mid_sweep(tmp_path, signal.SIGHUP)
    assert rc == 128 + signal.SIGHUP, err
    smb = [e for e in _entries(log) if e["instrument"] == "smb"]
    assert smb[-1]["op"] == "close"
    assert [e["command"] for e in smb if e["op"] == "write"][-1] == "OUTP OFF"
