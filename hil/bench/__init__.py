"""The bench: lab configurations, opening instruments by role, the lab clock (lab.py), and the
calibration jobs behind ``hil calibrate`` (calibrate.py).
"""
