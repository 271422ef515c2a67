"""Hyperparameter sweeps with Ray Tune, tracked as one MLflow run tree.

- `space`: distribution strings -> Tune domains; group options composed into plain blocks
- `plan`: validation of the `tune` block and of every trial config, before Ray starts
- `trial`: the trainable (one `pipeline.tasks.train.train` per trial, reporting each epoch)
- `mlflow_tree`: the driver-side callback writing the parent and child runs
- `results`: best trial, `results/tune/{best.yaml,trials.csv,curves.json}`
- `driver`: `run_sweep(cfg)`, the task the CLI and the DVC stage call
- `best`: applying `best.yaml` in the train task (no Ray import)
"""
