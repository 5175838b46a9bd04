"""Helpers shared by the driver tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from drivers.recording import ExchangeLog, RecordingTransport
from sims.visa import SIM_FILE, visa_library


def sim_backend(tmp_path: Path) -> Any:
    """The pyvisa backend for a private copy of the pyvisa-sim file (pyvisa caches simulator
    state per path), with out-of-range values queueing -222 (``sims.visa.visa_library``)."""
    path = tmp_path / "sim_lab.yaml"
    shutil.copy(SIM_FILE, path)
    return visa_library(path)


def open_spied(cls: Any, address: str, backend: Any, **kwargs: Any) -> tuple[Any, ExchangeLog]:
    """Open a driver whose every exchange lands in an in-memory log."""
    log = ExchangeLog()
    transport = RecordingTransport(cls.open_transport(address, backend, 500), log, "dut")
    return cls(transport, **kwargs), log
