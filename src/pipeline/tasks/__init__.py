"""Task functions: one per job, each taking the whole config and returning its results.

The CLI (`pipeline.cli.apps`), the DVC stages (`pipeline.cli.stages`), Ray Tune trials and
the tests all call these: `data.fetch`, `data.split`, `train.train`, `evaluate.evaluate`,
`tune.tune`, `cv.cross_validate`, `compare.compare`, `report.report`. Import them from their
modules so a light task (fetch) does not pay for importing the heavy ones.
"""
