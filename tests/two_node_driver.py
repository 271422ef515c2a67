"""The driver of `test_ray_two_nodes`, run as its own process as `pipeline tune` would be: Ray
reads RAY_AUTH_MODE and the token when it is imported, so a driver presents them from its
environment, set before it starts.

    python two_node_driver.py CONFIG STARTED NODES

CONFIG is the sweep's config (YAML, `tune.address` and `tune.storage_path` set), STARTED an
empty folder for `sweeps.WaitForTwoTrials`, NODES where to write the cluster's nodes (JSON).
The driver waits for both nodes, checks that the default local storage is refused on two
nodes, then runs the sweep with the data folder gone once the driver has read it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf, open_dict

import sweeps
from pipeline.errors import ConfigError
from pipeline.tasks import tune as tune_task

NODES_TIMEOUT_S = 120


def wait_for_nodes(address: str, count: int) -> list[dict]:
    """The cluster's nodes once `count` are alive: their ids and which one is the head."""
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        deadline = time.monotonic() + NODES_TIMEOUT_S
        while len(alive := [n for n in ray.nodes() if n["Alive"]]) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} of {count} Ray nodes alive after {NODES_TIMEOUT_S} s")
            time.sleep(0.5)
        return [{"node_id": n["NodeID"], "head": "node:__internal_head__" in n["Resources"]} for n in alive]
    finally:
        ray.shutdown()


def main(config: str, started: str, nodes: str) -> None:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sweeps)  # the workers cannot import tests/
    cfg = OmegaConf.load(config)
    Path(nodes).write_text(json.dumps(wait_for_nodes(cfg.tune.address, 2)))

    local = cfg.copy()
    with open_dict(local):
        local.tune.storage_path = None
    try:
        tune_task.tune(local)
    except ConfigError as err:
        print(f"refused: {err}", flush=True)
    else:
        sys.exit("a sweep on two nodes ran with the default local tune.storage_path")

    with sweeps.data_gone_once_loaded(tune_task, Path(cfg.paths.data_dir)) as loads:
        tune_task.tune(cfg, trial_callbacks=[sweeps.WaitForTwoTrials(started)])
    assert len(loads) == 1, loads  # the driver read the data, then it went away before any trial started


if __name__ == "__main__":
    main(*sys.argv[1:])
