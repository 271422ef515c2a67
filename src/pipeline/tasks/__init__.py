"""Task functions: one per job, each taking the whole config and returning metrics.

The CLI, the DVC stages, Ray Tune trials and the tests all call these:
`prepare.fetch`, `prepare.split`, `train.train`, `evaluate.evaluate`. Import them from
their modules so a light task (fetch) does not pay for importing the heavy ones.
"""
