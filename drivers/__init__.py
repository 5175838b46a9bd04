"""pyvisa instrument drivers (RF sources, nanovoltmeters, DC sources, analysers, switches, stages).

Imports nothing from the rest of the project.
"""
