"""Dataset layer: fetch any supported source into one canonical on-disk format."""

from pipeline.data.sources import fetch, list_sources, load_source
from pipeline.data.store import RawDataset, read_manifest, read_raw, write_raw

__all__ = [
    "RawDataset",
    "fetch",
    "list_sources",
    "load_source",
    "read_manifest",
    "read_raw",
    "write_raw",
]
