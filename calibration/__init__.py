"""Calibration routines that measure through ``drivers`` (never through the simulator's truth)."""
