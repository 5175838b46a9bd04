"""Driver names used in lab configurations, mapped to driver classes.

Each class carries what a configuration is validated against: ``KIND`` (which roles it can
fill), ``INTERFACES`` (which VISA address types reach it), ``OPTIONS`` and
``hard_limits(options)`` (what the instrument can do; a configuration may only tighten it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from drivers.base import Instrument, Limits
from drivers.dc_source import Keithley2400, Keithley2401, RohdeSchwarzHMP4040
from drivers.gaussmeter import LakeShore425
from drivers.nanovoltmeter import Keithley2182A
from drivers.oscillator_chip import OscillatorChipController
from drivers.rf_source import KeysightN5183B, RohdeSchwarzSMB100A
from drivers.rf_switch import MiniCircuitsRC1SP4T
from drivers.spectrum_analyzer import RohdeSchwarzFSV
from drivers.stages import NewportSMC100, ThorlabsKDC101

DRIVERS: Mapping[str, type[Instrument]] = {
    "rs_smb100a": RohdeSchwarzSMB100A,
    "keysight_n5183b": KeysightN5183B,
    "keithley_2182a": Keithley2182A,
    "keithley_2400": Keithley2400,
    "keithley_2401": Keithley2401,
    "rs_hmp4040": RohdeSchwarzHMP4040,
    "rs_fsv": RohdeSchwarzFSV,
    "minicircuits_rc_1sp4t": MiniCircuitsRC1SP4T,
    "newport_smc100": NewportSMC100,
    "thorlabs_kdc101": ThorlabsKDC101,
    "lakeshore_425": LakeShore425,
    "hil_oscillator_chip": OscillatorChipController,
}


def driver_class(name: str) -> type[Instrument]:
    """The class registered as ``name``; ``KeyError`` lists the known names."""
    try:
        return DRIVERS[name]
    except KeyError:
        raise KeyError(f"unknown driver {name!r}; known: {', '.join(DRIVERS)}") from None


def hard_limits(name: str, options: Mapping[str, Any] | None = None) -> Limits:
    """What the instrument behind driver ``name`` can do, given its options."""
    return driver_class(name).hard_limits(driver_class(name).validate_options(options))
