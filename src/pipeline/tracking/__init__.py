"""Experiment tracking: MLflow runs and the provenance (git commit, data hash) they record."""
