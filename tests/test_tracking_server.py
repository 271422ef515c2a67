"""Tracking to a team's MLflow server, set up as the README's "A team tracking server" says:
PostgreSQL (password authentication) as the backend store, artifacts proxied into their own
folder, MLflow's basic-auth app, the pipeline's credentials in the environment
(`tests/servers.py` starts and stops it all).

A sweep and a parallel cross-validation write everything into it as a regular user; a
request without credentials, or with a wrong password, is refused; and a task fails in
seconds with a ConfigError (exit status 2), before training, when the server is unreachable
or refuses it. Plus: MLflow credentials reach a Ray cluster only where Tune runs the
driver's loop there (`ray://`).
"""

from __future__ import annotations

import base64
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

import servers
from pipeline.errors import ConfigError
from pipeline.tasks.cv import cross_validate
from pipeline.tasks.data import ensure_data
from pipeline.tasks.train import train
from pipeline.tasks.tune import tune
from pipeline.tuning.ray_init import job_env
from procs import BIN, project_env

# One split (two folds) for both.
SWEEP = ["model=mlp", "data.split.folds=2", "tune.num_cpus=2", "tune.max_concurrent_trials=2", "tune.metric=val/acc", "tune.mode=max",
         "tune.num_samples=2", "tune.max_epochs=2", "tune.scheduler=fifo"]
CV = ["model=mlp", "data.split.folds=2", "trainer.max_epochs=2", "cv.parallel=true"]
FAIL_FAST_S = 120  # a refused connection used to cost four minutes of MLflow's retries


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory):
    with servers.team_mlflow_server(tmp_path_factory.mktemp("team-mlflow")) as server:
        yield server


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No MLflow credentials or tracking URI from the caller's environment or home folder."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.mlflow/credentials
    return monkeypatch


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _tree(client: MlflowClient, experiment: str) -> tuple[object, list, list]:
    """The experiment's one top-level run, its children, and all its runs."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) + 1 == len(runs)
    return parents[0], children, runs


def _stored(team: servers.TeamServer, client: MlflowClient, run) -> set[str]:
    """The run's artifacts as the server lists them, each checked to be a file in the
    server's artifact folder (not in the client's)."""
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    folder = team.artifacts / run.info.experiment_id / run.info.run_id / "artifacts"
    for path in listed:
        assert (folder / path).exists(), folder / path
    return listed


# ---------------------------------------------------------------------------- the team server

@pytest.mark.integration
@pytest.mark.slow
def test_sweep_and_parallel_cv_write_everything_to_the_team_server(local_ray, team, clean_env, cfg_factory,
                                                                   tmp_path: Path) -> None:
    import ray

    # Ray started before the credentials were set: no trial or fold process has them, so any
    # that talked to MLflow would be refused. The driver is the only writer.
    clean_env.setenv("MLFLOW_TRACKING_USERNAME", team.username)
    clean_env.setenv("MLFLOW_TRACKING_PASSWORD", team.password)
    assert ray.get(ray.remote(lambda: os.environ.get("MLFLOW_TRACKING_PASSWORD")).remote()) is None

    uri = f"tracking.tracking_uri={team.url}"
    sweep_cfg = cfg_factory([*SWEEP, uri, "tracking.experiment_name=team-sweep"])
    ensure_data(sweep_cfg)
    best = tune(sweep_cfg)
    cv = cross_validate(cfg_factory([*CV, uri, "tracking.experiment_name=team-cv"]))

    client = MlflowClient(team.url)
    parent, trials, sweep_runs = _tree(client, "team-sweep")
    assert len(trials) == 2 and parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial_id"] == best["trial_id"]
    assert parent.data.params["tune.scheduler"] == "fifo" and parent.data.metrics["trials"] == 2
    assert parent.data.metrics["best/val/acc"] == pytest.approx(best["value"], rel=1e-5)
    assert {"trials.csv", "curves.png", "best.yaml"} <= _stored(team, client, parent)
    for trial in trials:
        assert trial.info.status == "FINISHED" and "optimizer.lr" in trial.data.params
        for key in ("val/acc", "val/loss", "train/loss", "lr"):
            assert sorted(m.step for m in client.get_metric_history(trial.info.run_id, key)) == [0, 1], key

    parent, folds, cv_runs = _tree(client, "team-cv")
    assert sorted(f.data.tags["fold"] for f in folds) == ["0", "1"]
    assert parent.info.status == "FINISHED" and "cv.json" in _stored(team, client, parent)
    assert parent.data.metrics["cv/val/acc/mean"] == pytest.approx(cv["val/acc"]["mean"])
    for fold in folds:
        assert fold.info.status == "FINISHED" and fold.data.params["data.fold"] == fold.data.tags["fold"]
        assert sorted(m.step for m in client.get_metric_history(fold.info.run_id, "val/acc")) == [0, 1]
        assert "test/acc" in fold.data.metrics and "best/val/acc" in fold.data.metrics
        assert {"config.yaml", "learning_curves.png", "train.json", "test.json", "confusion.png"} <= \
            _stored(team, client, fold)

    # The runs are rows in PostgreSQL, and nothing went to the local store the config names.
    count = "SELECT count(*) FROM runs JOIN experiments USING (experiment_id) WHERE experiments.name = '{}';"
    assert int(servers.psql(team.postgres, count.format("team-sweep"), database="mlflow")) == len(sweep_runs) == 3
    assert int(servers.psql(team.postgres, count.format("team-cv"), database="mlflow")) == len(cv_runs) == 3
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_nobody_gets_in_without_the_right_password(team, clean_env, cfg_factory, tmp_path: Path) -> None:
    search = f"{team.url}/api/2.0/mlflow/experiments/search?max_results=1"
    artifacts = f"{team.url}/api/2.0/mlflow-artifacts/artifacts"
    for url in (search, artifacts):
        assert _status(url) == 401, url
        assert _status(url, (team.username, "wrong-password")) == 401, url
        assert _status(url, ("admin", "wrong-password")) == 401, url
    assert _status(search, (team.username, team.password)) == 200

    # PostgreSQL asks for the password too (no `trust`), on TCP and on its socket.
    for host in (team.postgres.host, str(team.postgres.sockets)):
        with pytest.raises(RuntimeError, match="password authentication failed"):
            servers.psql(team.postgres, "SELECT 1;", password="wrong-password", database="mlflow", host=host)

    # The pipeline stops before training (no checkpoint folder), naming the server and the fix.
    cfg = cfg_factory([f"tracking.tracking_uri={team.url}"])
    ensure_data(cfg)
    with pytest.raises(ConfigError, match=rf"{team.url} requires credentials and none were given \(HTTP 401\): "
                                          "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        train(cfg)
    clean_env.setenv("MLFLOW_TRACKING_USERNAME", team.username)
    clean_env.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
    with pytest.raises(ConfigError, match=rf"{team.url} refused user '{team.username}' \(HTTP 401: wrong password"):
        tune(cfg_factory([*SWEEP, f"tracking.tracking_uri={team.url}"]))  # before Ray starts
    assert not (tmp_path / "out" / "models").exists()


# ---------------------------------------------------------------------------- no server

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else b"" for p in folder.rglob("*")}


@pytest.mark.fault("4. Tracking server trouble", fault="tracking.tracking_uri names a server nobody runs "
                                                       "(`pipeline train`)",
                   expected="exit 2 in seconds, an error naming the URI and the fix, before any training; "
                            "no run folder, no data, earlier outputs untouched")
def test_unreachable_server_exits_2_in_seconds(tmp_path: Path, observe) -> None:
    url = f"http://127.0.0.1:{servers.free_port()}"  # nothing listens there
    earlier = tmp_path / "outputs" / "2026-01-01" / "12-00-00" / "metrics" / "train.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"val": {"acc": 0.97}}\n')  # an earlier run's outputs in this project
    before = _snapshot(tmp_path)
    start = time.monotonic()
    # The console script, as a user runs it. The timeout stops a regression to MLflow's four
    # minutes of retries from hanging the suite.
    result = subprocess.run([str(BIN / "pipeline"), "train", f"tracking.tracking_uri={url}", f"paths.root={tmp_path}"],
                            cwd=tmp_path, env=project_env(), capture_output=True, text=True, timeout=FAIL_FAST_S)
    seconds = time.monotonic() - start
    after = _snapshot(tmp_path)
    observe.saw(f"exit {result.returncode} after {seconds:.0f} s; "
                f"{'error names the URI' if url in result.stderr else 'URI not named'}; "
                f"{len(set(after) - set(before))} files or folders left behind")
    lost = observe.lost(outputs=sum(after.get(path) != content for path, content in before.items()))
    assert result.returncode == 2, result.stderr
    assert f"The MLflow tracking server {url} cannot be reached (Failed to establish a new connection" \
           in result.stderr
    assert "fix tracking.tracking_uri" in result.stderr and "Traceback" not in result.stderr
    # Stopped before fetching data, let alone training, and left no run folder (Hydra makes
    # one before the task starts), no store, nothing at all.
    assert after == before
    assert lost == {"runs": 0, "metrics": 0, "checkpoints": 0, "outputs": 0}


def test_credentials_reach_the_cluster_only_under_ray_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sent = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "secret"}
    # Tune's loop runs on the head node under Ray Client; elsewhere only the driver writes.
    assert sent.items() <= job_env("ray://10.0.0.10:10001").items()
    for address in ("10.0.0.10:6379", "auto"):
        assert not set(sent) & set(job_env(address)), address
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.10:10001")
    assert sent.items() <= job_env("auto").items()
