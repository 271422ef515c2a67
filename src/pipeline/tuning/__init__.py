"""Hyperparameter sweeps with Ray Tune, tracked as one MLflow run tree.

- `space`: distribution strings -> Tune domains; group options composed into plain blocks
- `plan`: validation of the `tune` block and of every trial config, before Ray starts
- `trial`: the trainable (one run of the train task it is given per trial, reporting each epoch)
- `mlflow_tree`: the driver-side callback writing the parent and child runs
- `results`: best trial, `results/tune/{best.yaml,trials.csv,curves.json}`
- `pareto`: several objectives (`tune.objectives`): the Pareto front, the trials' model costs,
  `results/tune/{pareto.csv,pareto.png}`
- `ray_init`: a private local Ray, or the cluster `tune.address` names (sweeps and parallel CV);
  `Shared`, the driver's data handed to trials through Ray's object store
- `driver`: `run_sweep(cfg, train=..., load=...)`, what the tune task (`pipeline.tasks.tune`) calls
- `best`: applying `best.yaml` in the train task (no Ray import)

The tasks sit above this package: it imports none of them, and is handed the train task and
the function that reads the data its trials train on.
"""
