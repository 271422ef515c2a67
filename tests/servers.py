"""Real servers for integration tests, started and stopped by the test that needs them: an
`mlflow server` (SQLite or PostgreSQL backend, optionally MLflow's basic-auth app) and a
throwaway PostgreSQL server.

Each binds 127.0.0.1 on a free port, keeps its files in its own temporary folder, and is
stopped by its own process id: other test runs on the machine are never touched.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_START_TIMEOUT_S = 120  # a cold `mlflow server` import + DB migration on a busy 2-CPU box
POSTGRES_START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, *, group: bool = True) -> None:
    """Stop a server this test started: `sig` to its process group (it was started with
    `start_new_session`), or to the process alone when it stops its own children; then
    SIGKILL to the group if it has not exited within 20 s."""
    try:
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------- mlflow server

@dataclass
class MlflowServer:
    url: str
    artifacts: Path
    root: Path
    proc: subprocess.Popen


@contextmanager
def mlflow_server(root: Path, backend_store_uri: str, *, env: Mapping[str, str] = (),
                  args: Sequence[str] = (), port: int | None = None) -> Iterator[MlflowServer]:
    """A real `mlflow server` on 127.0.0.1, proxying artifacts into `root/server-artifacts`.

    `env` adds to the server's environment (secrets go here, never on its command line) and
    `args` to its options (`--app-name basic-auth`). MLflow 3's security middleware accepts
    the Host 127.0.0.1 without `--allowed-hosts`. `--workers 1` and no job runner keep it to
    two processes. `port` (default: a free one) lets a test restart a server where it was.
    """
    artifacts = root / "server-artifacts"
    executable = Path(sys.executable).parent / "mlflow"
    assert executable.exists(), f"no mlflow script beside {sys.executable}"
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    # The server authenticates nobody with the test's own client settings.
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    # MLflow >= 3.5 also starts a job runner with ~7 Huey worker processes (GenAI scorers,
    # trace archival); on 2 CPUs they starve training for tens of seconds. Tracking needs none.
    server_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    server_env.update(env)
    log_path = root / "server.log"
    with log_path.open("ab") as log:  # a restarted server adds to its log
        proc = subprocess.Popen(
            [str(executable), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(artifacts), *args],
            cwd=root, env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_healthy(url, proc, log_path)
            yield MlflowServer(url=url, artifacts=artifacts, root=root, proc=proc)
        finally:
            stop(proc)


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:  # unprotected by auth
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S} s:\n"
                        f"{log_path.read_text()[-3000:]}")
        time.sleep(0.25)


# ---------------------------------------------------------------------------- postgresql

@dataclass
class Postgres:
    """A running throwaway server and the one role (with a password) that owns `databases`."""

    host: str
    port: int
    user: str
    password: str
    databases: tuple[str, ...]
    superuser_password: str
    bin: Path
    sockets: Path  # the folder of its unix socket

    def uri(self, database: str) -> str:
        """A SQLAlchemy URI without the password: libpq reads it from PGPASSWORD (or ~/.pgpass)."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"


def postgres_bin() -> Path:
    """The folder of initdb/postgres: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not versions:
        pytest.fail("PostgreSQL is not installed: `apt-get install -y postgresql` (Debian) to run this test.")
    return Path(versions[-1]).parent


def _as_server_user() -> dict:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` system user (the
    Debian package creates it); otherwise as ourselves."""
    if os.geteuid() != 0:
        return {}
    import pwd

    entry = pwd.getpwnam("postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@contextmanager
def postgres_server(*, user: str = "mlflow", databases: Sequence[str] = ("mlflow",)) -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster on 127.0.0.1 and a free port, password (scram-sha-256)
    authentication on TCP and socket alike, one login role owning `databases`; removed on exit.

    Its folder is a new one under the system temporary folder rather than pytest's, whose
    parents only root may enter, and belongs to the server's user.
    """
    bindir = postgres_bin()
    as_user = _as_server_user()
    folder = Path(tempfile.mkdtemp(prefix="pipeline-postgres-"))
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir()
    superuser_password, password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    pwfile = folder / "pwfile"
    pwfile.write_text(superuser_password + "\n")
    if as_user:
        for path in (folder, sockets, pwfile):
            os.chown(path, as_user["user"], as_user["group"])
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "HOME": str(folder)}
    proc = None
    try:
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
                        "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "--no-locale",
                        "-E", "UTF8", "--no-sync"],
                       cwd=folder, env=env, check=True, capture_output=True, **as_user)
        pwfile.unlink()
        port = free_port()
        # Durability settings off: the cluster lives for one test module.
        with (folder / "postgres.log").open("wb") as log:
            proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off"],
                cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **as_user)
        server = Postgres(host="127.0.0.1", port=port, user=user, password=password, databases=tuple(databases),
                          superuser_password=superuser_password, bin=bindir, sockets=sockets)
        _wait_ready(server, proc, folder / "postgres.log")
        sql = [f"CREATE ROLE {user} LOGIN PASSWORD '{password}';",
               *(f"CREATE DATABASE {db} OWNER {user};" for db in databases)]
        psql(server, "\n".join(sql), user="postgres", password=superuser_password)
        yield server
    finally:
        if proc is not None:
            stop(proc, signal.SIGINT, group=False)  # the postmaster's "fast" shutdown stops its children
        shutil.rmtree(folder, ignore_errors=True)


def psql(server: Postgres, sql: str, *, user: str | None = None, password: str | None = None,
         database: str = "postgres", host: str | None = None) -> str:
    """Run SQL through `psql` with a password, as a user would, over TCP (or the socket in the
    folder `host`); returns its output."""
    env = {**os.environ, "PGPASSWORD": password or server.password}
    result = subprocess.run(
        [str(server.bin / "psql"), "-h", host or server.host, "-p", str(server.port), "-U", user or server.user,
         "-d", database, "-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t"],
        input=sql, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"psql failed ({result.returncode}): {result.stderr}")
    return result.stdout


def _wait_ready(server: Postgres, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + POSTGRES_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"postgres exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        ready = subprocess.run([str(server.bin / "pg_isready"), "-q", "-h", server.host, "-p", str(server.port)])
        if ready.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"postgres not ready after {POSTGRES_START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------- a team's server

# MLflow's basic-auth settings (its own basic_auth.ini, the users in PostgreSQL). No password
# here: MLflow creates the admin from MLFLOW_AUTH_ADMIN_PASSWORD on its first start.
AUTH_INI = """[mlflow]
default_permission = READ
database_uri = {database_uri}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


@dataclass
class TeamServer:
    """An auth-enabled `mlflow server` on PostgreSQL, and a regular user's credentials."""

    url: str
    artifacts: Path
    postgres: Postgres
    admin_password: str
    username: str
    password: str


@contextmanager
def team_mlflow_server(root: Path, *, username: str = "pipeline") -> Iterator[TeamServer]:
    """The README's team server: PostgreSQL (password authentication) as backend and auth
    store, artifacts proxied into their own folder, MLflow's basic-auth app, secrets passed
    through the environment only; plus a regular (non-admin) user `username`."""
    from mlflow.server.auth.client import AuthServiceClient

    with postgres_server(databases=("mlflow", "mlflow_auth")) as pg:
        config = root / "basic_auth.ini"
        config.write_text(AUTH_INI.format(database_uri=pg.uri("mlflow_auth")))
        admin_password, password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        env = {"PGPASSWORD": pg.password, "MLFLOW_AUTH_CONFIG_PATH": str(config),
               "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
        with mlflow_server(root, pg.uri("mlflow"), env=env, args=["--app-name", "basic-auth"]) as server:
            with pytest.MonkeyPatch.context() as patch:  # the admin's client, for this call only
                patch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
                patch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
                AuthServiceClient(server.url).create_user(username, password)
            yield TeamServer(url=server.url, artifacts=server.artifacts, postgres=pg,
                             admin_password=admin_password, username=username, password=password)
