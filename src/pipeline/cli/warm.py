"""Warm stages: with `PIPELINE_WARM=1` (`make run` sets it), a DVC stage runs in a process
forked from a server that has already imported torch, Lightning, MLflow and Ray.

Every stage that builds a model otherwise pays those imports before its first useful step:
3-10 s each, six stages a run. `python -m pipeline.cli.warm start` (`make run`, before DVC)
or the first stage starts the server in the background; it imports while DVC and the data
stages run, then forks one child per stage, and the workers of a stage's parallel folds
(`fold_pool.start_workers_with`), which would otherwise import for 8 s each. The stage's
own process stays a thin client: it hands the server its arguments, working directory,
environment and standard streams (the file descriptors themselves, so output goes straight to
DVC or the terminal), passes on the signals it gets (SIGINT, SIGTERM, SIGHUP) and exits with
the child's status. The child runs the stage exactly as `python -m pipeline.cli.stages` would.

What keeps this safe:
- The server is keyed by the Python executable, `sys.path` (and site-packages' modification
  time, which installing or removing a package changes), the settings libraries read as they
  load (`LOAD_TIME_ENV`) and every file of this package (path, time, size): changed code gets
  a new server, and an idle one exits after `IDLE_S`.
- The server imports only: it runs no torch operation, so no thread pool exists to be broken
  by `fork`. Its socket sits in a folder only this user can open, and it serves this user only.
- A client that dies (SIGKILL) takes its stage with it: the server kills the child's process
  group when the client's connection closes before the child ended.
- Nothing is ever half warm: a server that is not ready within `READY_WAIT_S`, or fails, means
  the stage runs in its own process, as without `PIPELINE_WARM`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ENV = "PIPELINE_WARM"
IDLE_S = 120       # a server with no stage for this long exits (`PIPELINE_WARM_IDLE_S`)
READY_WAIT_S = 60  # how long a stage waits for a server still importing, then runs on its own
# What the server imports before it serves (6 s here): what every stage that builds a model
# needs, the sweep's driver (the first of them) included; then, between requests, Lightning
# (3.4 s; the stages that train) and the stages' own modules.
WARM_FIRST = ("torch", "mlflow", "mlflow.store.tracking.sqlalchemy_store", "ray", "ray.tune")
WARM_LATER = ("lightning",)

LOAD_TIME_ENV = ("OMP_", "MKL_", "KMP_", "CUDA_", "PYTORCH_", "TORCH_", "LD_", "PYTHON")
MAX_SOCKET_PATH = 103  # bytes of a Unix socket's path: 107 on Linux, 103 on macOS
_server: Path | None = None  # in a server's child: that server's socket
_HEADER = struct.Struct("!Q")  # a request's length; a child's pid
_STATUS = struct.Struct("!q")  # a child's exit status, -N if signal N killed it
log = logging.getLogger(__name__)


def wanted() -> bool:
    """Whether this process is to run its stage warm (`PIPELINE_WARM=1`)."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _folder() -> Path:
    """This user's folder of servers' sockets and locks, closed to everyone else."""
    folder = Path(tempfile.gettempdir()) / f"pipeline-warm-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{folder} is not this user's alone")
    return folder


def key() -> str:
    """What a server must match to serve this process: its Python, import path, code and the
    settings libraries read as they load."""
    digest = hashlib.sha256(sys.executable.encode())
    # Read once, when the libraries load (OpenMP, MKL, CUDA's and torch's own settings): a
    # server started under other values would not honour this stage's.
    for name in sorted(n for n in os.environ if n.startswith(LOAD_TIME_ENV)):
        digest.update(f"{name}={os.environ[name]}\0".encode())
    for entry in sys.path:
        digest.update(f"{entry}\0".encode())
        if Path(entry).name in ("site-packages", "dist-packages"):  # (un)installing changes its time
            with contextlib.suppress(OSError):
                digest.update(f"{os.stat(entry).st_mtime_ns}\0".encode())
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        info = path.stat()
        digest.update(f"{path}\0{info.st_mtime_ns}\0{info.st_size}\0".encode())
    return digest.hexdigest()[:16]


def _paths(name: str) -> tuple[Path, Path]:
    folder = _folder()
    sock = folder / f"{name}.sock"
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise OSError(f"{sock} is too long for a socket's path ({len(os.fsencode(sock))} bytes, at most "
                      f"{MAX_SOCKET_PATH}): set TMPDIR to a shorter folder")
    return sock, folder / f"{name}.lock"


def _held(lock: Path) -> bool:
    """Whether a live server holds `lock` (it does from its start to its exit)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _connect(sock_path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(sock_path))
    except OSError:
        sock.close()
        return None
    return sock


def start_server(name: str | None = None) -> None:
    """Start this code's server in the background unless one runs or is starting."""
    try:
        name = name or key()
        sock_path, lock = _paths(name)
        if _held(lock):
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
        with open(_folder() / f"{name}.log", "ab") as err:
            subprocess.Popen([sys.executable, "-m", "pipeline.cli.warm", "serve", name], env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                             start_new_session=True, close_fds=True)
    except OSError as err:
        log.warning("could not start a warm server (%s): stages run in their own processes", err)


def delegate(argv: list[str]) -> int | None:
    """Run the stage `argv` in a warm server's child: its exit status, or None where no server
    could take it (the caller runs it itself)."""
    try:
        name = key()
        sock_path, lock = _paths(name)
        sock = _connect(sock_path)
        if sock is None:
            start_server(name)
            started = time.monotonic()
            while sock is None and time.monotonic() - started < READY_WAIT_S:
                time.sleep(0.05)
                sock = _connect(sock_path)
                if sock is None and time.monotonic() - started > 5 and not _held(lock):
                    break  # the server died while importing (its log is in the folder)
        if sock is None:
            return None
    except OSError as err:
        log.warning("no warm server (%s): the stage runs in its own process", err)
        return None
    with sock:
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                              "umask": _umask()}).encode()
        try:
            socket.send_fds(sock, [_HEADER.pack(len(request)) + request], [0, 1, 2])
            reply = _recv_exact(sock, _HEADER.size)
        except OSError:
            return None
        if reply is None:
            return None  # the server went away before it forked: nothing ran
        child = _HEADER.unpack(reply)[0]
        forwarded = {sig: signal.signal(sig, lambda signum, _: _forward(child, signum))
                     for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            reply = _recv_exact(sock, _STATUS.size)
        except OSError:
            reply = None
        finally:
            for sig, previous in forwarded.items():
                signal.signal(sig, previous)
    if reply is None:  # the server died under the stage (and the stage with it): a failure
        return 1
    code = _STATUS.unpack(reply)[0]
    return code if code >= 0 else 128 - code  # as a shell reports a signal


def _forward(child: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signum)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# The server -----------------------------------------------------------------------------


def serve(name: str) -> dict[str, Any] | None:
    """Import, then fork a child per request until idle. Returns in each child only, with the
    request it is to run (the server itself exits here)."""
    sock_path, lock = _paths(name)
    lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None  # another server of this code runs or is starting
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, str(os.getpid()).encode())  # for `stop`, even while it imports
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is for the stages, which their clients pass on
    signal.signal(signal.SIGTERM, _exit_on_signal)  # `stop`: through the `finally` below
    request = None
    try:
        import importlib

        from pipeline.cli import stages
        for module in WARM_FIRST:
            importlib.import_module(module)
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(sock_path))
            listener.listen(8)
            later = [*WARM_LATER, *dict.fromkeys(m for stage in stages.STAGES for m in stages.stage_modules(stage))]
            request = _fork_per_request(listener, later)
    finally:
        if request is None:  # the server's end (a child leaves the files to it)
            log_path = sock_path.with_suffix(".log")  # kept if something went wrong
            for path in (sock_path, *([log_path] if _empty(log_path) else []), lock):  # the lock last, still held
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
    if request is not None:
        os.close(lock_fd)
    return request


def _empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return False


def _fork_per_request(listener: socket.socket, later: list[str]) -> dict[str, Any] | None:
    """The server's loop: a child per request, its status to its client when it ends, and the
    `later` modules imported one by one while nothing else is to be done. Returns the request
    in each child; None in the server once idle for PIPELINE_WARM_IDLE_S."""
    import importlib

    children: dict[int, socket.socket] = {}  # a running stage's pid: its client's connection
    idle_s = float(os.environ.get(f"{ENV}_IDLE_S", IDLE_S))
    idle_since = time.monotonic()
    try:
        while children or time.monotonic() - idle_since < idle_s:
            ready, _, _ = select.select([listener, *children.values()], [], [], 0 if later else 0.2)
            if not ready and later:
                importlib.import_module(later.pop(0))
            if listener in ready:
                conn, _ = listener.accept()
                request = _receive(conn)
                if request is None:
                    conn.close()
                    continue
                for stream in (sys.stdout, sys.stderr):  # nothing of ours for the stage's streams
                    stream.flush()
                pid = os.fork()
                if pid == 0:
                    for other in (conn, *children.values()):
                        other.close()
                    children = {}  # (for the `finally` below: the server's alone)
                    return _become(request, Path(listener.getsockname()))
                for fd in request["fds"]:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    conn.sendall(_HEADER.pack(pid))
                children[pid] = conn
            for pid, conn in list(children.items()):
                if conn in ready:  # a client never writes after its request: it is gone
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
            for pid, conn in list(children.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    with contextlib.suppress(OSError):
                        conn.sendall(_STATUS.pack(os.waitstatus_to_exitcode(status)))
                    conn.close()
                    del children[pid]
                    idle_since = time.monotonic()
    finally:
        for pid in children:  # stopped under a running stage: it ends as on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
    return None


def _exit_on_signal(signum: int, _: Any) -> None:
    raise SystemExit(128 + signum)


def _receive(conn: socket.socket) -> dict[str, Any] | None:
    """One request: the stage's arguments, directory, environment, and its three streams (a
    worker's request: also its end of the pipe to the pool). None from another user, or if
    the request is cut short."""
    if conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))[4:8] != \
            struct.pack("i", os.getuid()):
        return None
    conn.settimeout(10)
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 4)
        size = _HEADER.unpack(data[:_HEADER.size])[0] if len(data) >= _HEADER.size else -1
        data = data[_HEADER.size:]
        while 0 <= size and len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                break
            data += chunk
        if len(fds) >= 3 and 0 <= size == len(data):
            conn.settimeout(None)
            return {**json.loads(data), "fds": fds}
    except (OSError, ValueError):  # (a json.JSONDecodeError is a ValueError)
        pass
    for fd in fds:
        os.close(fd)
    return None


def _become(request: dict[str, Any], server: Path) -> dict[str, Any]:
    """Make this forked child the stage's process (or a stage's worker), as its client was
    started; its own pool workers will be forked by `server` too."""
    global _server
    _server = server
    os.setpgid(0, 0)  # its own group: the server ends it and what it started at once
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    for target, fd in enumerate(request["fds"][:3]):
        os.dup2(fd, target)
        os.close(fd)
    # Python's own streams keep their objects (libraries hold them since their import) and
    # take the buffering a fresh process would give them on these descriptors.
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdout.reconfigure(line_buffering=os.isatty(1), write_through=unbuffered)
    sys.stderr.reconfigure(line_buffering=True, write_through=unbuffered)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.argv = [str(Path(__file__).with_name("stages.py")), *request.get("argv", [])]
    from pipeline.tasks import fold_pool
    fold_pool.start_workers_with(fork_worker)
    return request


# A stage's pool workers -----------------------------------------------------------------

def fork_worker(target: Callable[..., Any], conn: Connection, args: tuple[Any, ...]) -> _Forked | None:
    """A pool worker running `target(conn, *args)`, forked by the server this stage came
    from (its imports done: no 8 s wait for torch and Lightning); None if it cannot."""
    sock = _connect(_server) if _server is not None else None
    if sock is None:
        return None
    call = base64.b64encode(pickle.dumps((target, args))).decode()
    request = json.dumps({"kind": "worker", "call": call, "cwd": os.getcwd(), "env": dict(os.environ),
                          "umask": _umask()}).encode()
    try:
        socket.send_fds(sock, [_HEADER.pack(len(request)) + request], [0, 1, 2, conn.fileno()])
        reply = _recv_exact(sock, _HEADER.size)
    except OSError:
        reply = None
    if reply is None:
        sock.close()
        return None
    return _Forked(sock, _HEADER.unpack(reply)[0])


class _Forked:
    """A worker forked by the server, with what `ProcessPool` uses of a `multiprocessing.Process`.
    Its connection to the server is its sentinel: the server sends the exit status, then
    closes it; closing it first (this process dying) makes the server kill the worker."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self._sock, self.pid = sock, pid
        self.sentinel = sock.fileno()
        self.exitcode: int | None = None

    def join(self, timeout: float | None = None) -> None:
        if self.exitcode is None and select.select([self._sock], [], [], timeout)[0]:
            reply = _recv_exact(self._sock, _STATUS.size)
            self.exitcode = _STATUS.unpack(reply)[0] if reply is not None else -signal.SIGKILL  # server gone
            self._sock.close()

    def is_alive(self) -> bool:
        self.join(0)
        return self.exitcode is None

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


def stop(name: str | None = None) -> bool:
    """Stop this code's server (`python -m pipeline.cli.warm stop`), ready or still importing;
    whether one ran. A stage it runs ends as on SIGTERM."""
    _, lock = _paths(name or key())
    if not _held(lock):
        return False
    with contextlib.suppress(ValueError, OSError):
        os.kill(int(lock.read_text()), signal.SIGTERM)
        return True
    return False


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"] and len(argv) == 2:
        request = serve(argv[1])
        if request is None:
            return 0
        if request.get("kind") == "worker":
            target, args = pickle.loads(base64.b64decode(request["call"]))
            target(Connection(request["fds"][3]), *args)
            return 0
        from pipeline.cli.stages import run_stage
        return run_stage(*request["argv"][:2], watch_dvc=False)
    if argv == ["start"]:  # ahead of `dvc repro` (make run): its imports overlap DVC's start
        start_server()
        return 0
    if argv == ["stop"]:
        return 0 if stop() else 1
    print("usage: python -m pipeline.cli.warm start | stop | serve <key>", file=sys.stderr)
    return 2


if __name__ == "__main__":
    from pipeline.cli import exits
    exits.leave(main(sys.argv[1:]))
