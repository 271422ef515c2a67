"""DVC stages: one module each, with a `main()` that reads params.yaml and calls a task."""
