"""Plain Python values from what configs and sweeps hand around.

Model arguments, optimizer settings and sweep results arrive as OmegaConf nodes, tuples or
numpy scalars (Ray Tune's samplers draw those); YAML, pickling, MLflow and ``inspect``
defaults want dicts, lists and Python numbers. One function makes them so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf


def plain(value: Any) -> Any:
    """Mappings → dicts, other sequences (not strings) → lists, numpy scalars → numbers.

    OmegaConf nodes are resolved in place first, so an interpolation still sees the config
    it came from, and a missing ``???`` stays the string for the caller's check to name.
    """
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy and torch scalars (and arrays, as nested lists)
        return value.tolist()
    return value
