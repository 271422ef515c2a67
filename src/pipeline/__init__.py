"""CNN image-classification experiment pipeline: DVC + Hydra + Lightning + Ray Tune + MLflow."""

__version__ = "0.1.0"
