"""An ad-hoc run's log (`pipeline.tracking.runlog`): the pipeline's records at INFO and above
and every warning, in `<out>/run.log`, attached to the MLflow runs it started, also when the
run fails; the console keeps its own level."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.tracking.mlflow_run import TrackedRun
from pipeline.tracking.runlog import run_log


def test_the_log_is_written_and_attached_even_on_failure(tmp_path: Path, capsys) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    console = logging.StreamHandler()  # as conf/hydra/job_logging: the pipeline's console at WARNING
    pipeline_log = logging.getLogger("pipeline")
    level = pipeline_log.level
    pipeline_log.setLevel(logging.WARNING)
    pipeline_log.addHandler(console)
    logging.getLogger("pipeline.tasks.chatty").setLevel(logging.INFO)  # as conf sets the fetch's progress
    out = tmp_path / "out"
    out.mkdir()
    try:
        with pytest.raises(RuntimeError, match="boom"), run_log(out) as path:
            parent = TrackedRun.start(tracking_uri=store, experiment="e")
            child = TrackedRun.start(tracking_uri=store, experiment="e", parent_run_id=parent.run_id)
            logging.getLogger("pipeline.tasks.x").info("an info line for the file")
            logging.getLogger("pipeline.tasks.chatty").info("progress for both")  # its own level: INFO
            logging.getLogger("pipeline.tasks.x").warning("a warning line for both")
            logging.getLogger("elsewhere").warning("not the pipeline's")
            warnings.warn("a library's warning", UserWarning, stacklevel=1)
            parent.finish("FAILED")
            child.finish("FAILED")
            raise RuntimeError("boom")
    finally:
        pipeline_log.removeHandler(console)
        pipeline_log.setLevel(level)
        logging.getLogger("pipeline.tasks.chatty").setLevel(logging.NOTSET)
    text = path.read_text()
    assert path == out / "run.log"
    for line in ("INFO pipeline.tasks.x: an info line for the file", "WARNING pipeline.tasks.x: a warning line",
                 "UserWarning: a library's warning", "Ended by RuntimeError: boom", "Traceback"):
        assert line in text, line
    assert "not the pipeline's" not in text
    err = capsys.readouterr().err
    assert "a warning line for both" in err and "an info line" not in err  # the console's level holds
    assert "progress for both" in err and "progress for both" in text  # and so does a logger's own
    assert pipeline_log.level == level and not console.filters  # all put back
    client = MlflowClient(store)
    assert [a.path for a in client.list_artifacts(parent.run_id)] == ["run.log"]
    assert client.list_artifacts(child.run_id) == []  # a nested run is part of its parent's story
