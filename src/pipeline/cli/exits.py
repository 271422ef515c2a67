"""The one place where errors and signals become exit statuses.

    0    success
    1    a bug: any other exception (its traceback is printed)
    2    a user error (`PipelineError`): a bad config value or override, missing or corrupt data,
         no space left for the outputs
    130  interrupted by SIGINT (Ctrl+C)
    141  the reader of the output went away (`pipeline models | head`)
    143  terminated by SIGTERM (a scheduler, `kill`, `timeout`)

Every way in (the Hydra apps, the DVC stage runner, the `pipeline` tool) runs its body
through `run`, so `dvc repro`, SLURM, Kubernetes and shell scripts never read success after
a failure. Below, the libraries that catch signals themselves hand them on as these
exceptions: Lightning in `pipeline.training.fit`, Ray and Ray Tune in
`pipeline.tuning.stopping`.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from pipeline.errors import PipelineError, Terminated
from pipeline.files import NO_ROOM

INTERRUPTED = 130  # 128 + SIGINT
BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader went away (`pipeline models | head`)
TERMINATED = 143   # 128 + SIGTERM


def terminate_once() -> Callable[[int, Any], None]:
    """A SIGTERM handler that raises `Terminated` the first time only. Later SIGTERMs (a
    scheduler repeating itself, the DVC watch in `stages`) must not cut short the cleanup on
    the way out, e.g. an MLflow run being marked KILLED; SIGKILL still ends a process at once."""
    fired = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if not fired.is_set():
            fired.set()
            raise Terminated(f"terminated by signal {signum}")

    return handler


def run(body: Callable[[], object]) -> int:
    """Run `body()` and return its exit status; a user error prints its message only."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate_once()) if main_thread else None
    try:
        body()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except Terminated as err:
        print(str(err) or "terminated", file=sys.stderr)
        return TERMINATED
    except BrokenPipeError:
        # Python would print a traceback, then fail again flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except OSError as err:
        if err.errno not in NO_ROOM:
            raise
        # A write of a library's own (MLflow's store, Ray's results) on a full disk: say so, as
        # `pipeline.files` does for ours, rather than a traceback.
        where = f" writing {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}: no space left for the outputs. Free space on that disk (or "
              "set paths.out_dir to a folder on a disk with room) and run again.", file=sys.stderr)
        return PipelineError.exit_code
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def leave(status: int) -> NoReturn:
    """End the process with `status` once its work is done, without the interpreter's teardown.

    After torch and Lightning are imported, Python's teardown (clearing every module, a last
    garbage collection, C++ destructors) takes 1.2-2 s here, all of it after the last output
    and before DVC may go on to the next stage. What a normal exit does that matters still
    happens, in Python's order: non-daemon threads are waited for (by exiting normally if
    any still runs), then the atexit handlers (logging's flush, MLflow's and Ray's shutdown,
    temporary folders' finalizers), then the streams are flushed. For `__main__` entries
    only: a caller in the same process (a test) gets the status from the function it called.
    Under a profiler, tracer or debugger (cProfile, trace, coverage, pdb), which write their
    results after the program returns, the exit is a normal one.
    """
    if sys.getprofile() is not None or sys.gettrace() is not None or any(
            t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(status)
    atexit._run_exitfuncs()  # what Py_FinalizeEx runs first; CPython has no public spelling of it
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone, a stream closed: a normal exit ignores these too
            pass
    os._exit(status)
