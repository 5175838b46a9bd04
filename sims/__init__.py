"""Simulated hardware: neuron physics, simulated devices and simulated instruments.

Imports nothing from the rest of the project.
"""
