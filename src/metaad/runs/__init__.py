"""Fitting, calibrating, evaluating and reporting a run, and the run folder's layout."""
