"""Virtual spintronics lab: physics-coupled simulated instruments behind the real drivers.

- ``world.World``: one simulated bench (clock, magnet array, fabricated sample, instruments,
  wiring); ``World.from_file(path, seed=..., overrides=...)``; ``world.truth()`` for tests
  and reports only.
- ``visa.VirtualVisaLibrary``: the pyvisa backend; ``VirtualVisaLibrary.for_world(world)``
  goes where a VISA library goes (``pyvisa.ResourceManager(lib)``).
- ``clock.VirtualClock``: lab time, advanced by what the instruments do.
- ``config``: world files (``worlds/*.yaml``), defaults and validation.
- Instrument models: ``sources`` (SMB100A, N5183B, the VCO source of thesis 4.5), ``meters``
  (2182A, FSV), ``supplies`` (HMP4040, 2400/2401), ``switches`` (RC-1SP4T), ``stages``
  (SMC100, KDC101), ``chip`` (the oscillator-array chip controller over the simulated chip of
  ``sims.oscillator_device``); ``sample`` (fabrication, pose, rectified voltages).

The physics is in ``sims.spindiode``. Imports nothing from the rest of the project.
"""

from sims.virtual_lab.clock import VirtualClock
from sims.virtual_lab.config import WorldConfigError, load_world_config
from sims.virtual_lab.visa import VirtualVisaLibrary
from sims.virtual_lab.world import WORLDS_DIR, World

__all__ = ["WORLDS_DIR", "VirtualClock", "VirtualVisaLibrary", "World", "WorldConfigError",
           "load_world_config"]
