"""Metrics as plain functions: AUROC, FPR@95, AUPR and accuracy on score arrays (`detection`)
and paired bootstrap resampling of them (`bootstrap`). sklearn is their test oracle."""
