"""Evaluation stage: metrics, gathered evaluation, ensembles, reports."""
