"""The bench: lab configurations, opening instruments by role, the lab clock.
"""
