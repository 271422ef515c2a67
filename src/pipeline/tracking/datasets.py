"""The data a run used, as MLflow datasets: what the runs table's Dataset column and the run
page's "Datasets used" show (`digits (7c2fe19f)`, with its context: training, validation,
testing).

Only metadata is logged (MLflow's `MetaDataset`): the name, a digest, where the data lives,
its schema and its row count. The images are not copied into a pandas frame nor read again:
the digest comes from hashes the pipeline already has (the split's, the fetched data's
manifest). A digest names one subset of one split of one fetched dataset, so runs that
trained on different splits, or on different folds of one split, are told apart at a glance.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

CONTEXTS = ("training", "validation", "testing")


def dataset_input(*, name: str, data_hash: str, split_hash: str, subset: str, source: str, context: str,
                  image_shape: tuple[int, ...], rows: int) -> dict[str, Any]:
    """One input of a run as plain values (a fold's recorded run carries it to its driver):
    `subset` of the split `split_hash` of the data `data_hash`, used as `context`."""
    if context not in CONTEXTS:
        raise ValueError(f"context {context!r} is not one of {CONTEXTS}")
    digest = hashlib.sha256(f"{data_hash}:{split_hash}:{subset}".encode()).hexdigest()[:8]
    return {"name": name, "digest": digest, "source": source, "context": context,
            "image_shape": list(image_shape), "rows": int(rows), "subset": subset}


def to_entities(inputs: list[dict[str, Any]]) -> list[Any]:
    """`mlflow.entities.DatasetInput`s for `MlflowClient.log_inputs`."""
    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types.schema import Schema, TensorSpec
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    entities = []
    for item in inputs:
        schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, *item["image_shape"]), "image"),
                         TensorSpec(np.dtype(np.int64), (-1,), "label")])
        meta = MetaDataset(LocalArtifactDatasetSource(item["source"]), name=item["name"], digest=item["digest"],
                           schema=schema).to_dict()
        profile = json.dumps({"num_rows": item["rows"], "subset": item["subset"]})
        dataset = Dataset(name=meta["name"], digest=meta["digest"], source_type=meta["source_type"],
                          source=meta["source"], schema=meta.get("schema"), profile=profile)
        entities.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, item["context"])]))
    return entities
