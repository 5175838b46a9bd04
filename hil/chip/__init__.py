"""The chip side: backends (simulated chip, lab bench), the digital twin, chip-in-the-loop training
and its gradient estimators, upload and the mismatch, gap and device-budget studies.
"""
