"""Whole tasks built on the engine's cached experiments: calibration under logit noise,
operating points, failure detection, robust-vs-standard comparison, adversarial attacks on
detectors, dataset status and fetch, and regenerating published tables. Each returns data
(frames, records); the report floor renders them."""
