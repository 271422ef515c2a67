"""Image-classification models, created by name: ``create_model("lenet5", ...)``."""

# Importing the family modules runs their @register_model decorators.
from pipeline.models import alexnet, densenet, googlenet, lenet, mlp, resnet, resnext, vgg  # noqa: F401
from pipeline.models.complexity import count_macs, count_parameters, measure_latency
from pipeline.models.registry import (
    create_model,
    list_models,
    min_image_size,
    model_defaults,
    register_model,
)

__all__ = [
    "count_macs",
    "count_parameters",
    "create_model",
    "list_models",
    "measure_latency",
    "min_image_size",
    "model_defaults",
    "register_model",
]
