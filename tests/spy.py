"""Helpers shared by the driver tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from drivers.recording import ExchangeLog, RecordingTransport
from sims.visa import SIM_FILE, install_range_errors


def sim_backend(tmp_path: Path) -> str:
    """A private copy of the pyvisa-sim file (pyvisa caches simulator state per path), with
    out-of-range values queueing -222 (``sims.visa.install_range_errors``)."""
    install_range_errors()
    path = tmp_path / "sim_lab.yaml"
    shutil.copy(SIM_FILE, path)
    return f"{path}@sim"


def open_spied(cls: Any, address: str, backend: str, **kwargs: Any) -> tuple[Any, ExchangeLog]:
    """Open a driver whose every exchange lands in an in-memory log."""
    log = ExchangeLog()
    transport = RecordingTransport(cls.open_transport(address, backend, 500), log, "dut")
    return cls(transport, **kwargs), log
