"""hil: hardware-in-the-loop training for physical neural networks.

The core package: differentiable models of spintronic networks, tasks, trainers,
hyperparameter search, run folders and the ``hil`` command line.
"""

__version__ = "0.1.0"
