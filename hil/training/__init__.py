"""Off-chip training of stacked trials and the hyperparameter search.
"""
