"""pyvisa instrument drivers (RF sources, nanovoltmeters, DC sources, analysers, switches, stages).

Imports nothing from the rest of the project.

- ``base``: transport interface, limits that only tighten, declarative settings, the
  ``Instrument``/``ScpiInstrument`` bases (identity check, error check after every set,
  timeouts naming instrument and command, safe shutdown on close and on exceptions).
- ``rf_source``: R&S SMB100A, Keysight N5183B.
- ``nanovoltmeter``: Keithley 2182A and the RF on/off ``differential_measurement``.
- ``dc_source``: Keithley 2400/2401, R&S HMP4040.
- ``spectrum_analyzer``: R&S FSV.
- ``rf_switch``: Mini-Circuits RC-1SP4T-A18 (and ``SwitchGate``).
- ``stages``: Newport SMC100 (ASCII), Thorlabs KDC101 (APT binary).
- ``gaussmeter``: Lake Shore 425 (Hall probe; measures the field gradient).
- ``recording``: record every exchange to JSON lines; replay a recorded session.
- ``registry``: driver names used in lab configurations.

The pyvisa-sim definitions of these instruments are in ``sims/visa/sim_lab.yaml`` (the
gaussmeter's in ``sims/visa/lakeshore_425.yaml``).
"""
