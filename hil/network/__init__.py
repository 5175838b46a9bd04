"""The differentiable network: the model, its integration engines (the native kernel beside them),
the tasks, and the checks and analyses of a trained network.
"""
