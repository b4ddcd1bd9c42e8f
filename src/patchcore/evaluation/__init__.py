"""Evaluation: metrics, evaluating a model on a data set's test split, and the run reports."""
