"""Stop signals in a process that drives Ray: SIGTERM must end it as `Terminated` (exit
status 143, MLflow runs KILLED), and Ray gets in the way three times.

- `ray.init` replaces the SIGTERM handler with `sys.exit(15)`: the process would exit 15 and
  an MLflow run around it end FAILED. `keeps_sigterm_handler` puts the caller's back.
- Ray's blocking calls (`ray.get`, `ray.wait`) run Python's signal handlers from C++ and pass
  on KeyboardInterrupt alone: a `Terminated` raised there surfaces as a SystemError, or is
  lost and the call goes on waiting. `sigterm_interrupts_ray`: SIGTERM raises
  KeyboardInterrupt inside the block, which leaves it as `Terminated`.
- Ray Tune catches SIGINT (and SIGUSR1) while its loop runs, stops the trials and saves the
  experiment for `tune.resume=true`. `sigterm_stops_sweep`: SIGTERM does the same, and the
  sweep then ends with `Terminated` instead of `SweepInterrupted` (130).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.errors import Terminated


@contextlib.contextmanager
def keeps_sigterm_handler() -> Iterator[None]:
    """Around `ray.init`: the SIGTERM handler before it is restored after it, if it was a
    Python function (the CLI's, which raises `Terminated`). Otherwise Ray's stays: it exits
    through `atexit`, which shuts down the Ray this process started."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(previous) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _on_sigterm(act: Callable[[Any], None]) -> Iterator[threading.Event]:
    """The first SIGTERM sets the event yielded and calls `act(frame)` (later ones are ignored,
    as in `pipeline.cli.exits`: the stop is under way); a KeyboardInterrupt leaving the block
    after a SIGTERM becomes `Terminated`."""
    terminated = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals are the main thread's
        yield terminated
        return

    def handler(signum: int, frame: Any) -> None:
        if not terminated.is_set():
            terminated.set()
            act(frame)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield terminated
    except KeyboardInterrupt:
        if terminated.is_set():
            raise Terminated("terminated by SIGTERM") from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(frame: Any) -> None:
    raise KeyboardInterrupt


def sigterm_interrupts_ray() -> contextlib.AbstractContextManager[threading.Event]:
    """Around blocking Ray calls: SIGTERM ends them, and the block, with `Terminated`."""
    return _on_sigterm(_interrupt)


@contextlib.contextmanager
def sigterm_stops_sweep() -> Iterator[threading.Event]:
    """Around `Tuner.fit()`: SIGTERM calls Ray Tune's SIGINT handler (outside Tune's loop it
    ends the block with `Terminated` at once); the event yielded tells whether it came. The
    handlers Ray Tune leaves installed are restored afterwards, so that a Ctrl+C after the
    loop interrupts again instead of setting a flag no one reads."""
    others = [getattr(signal, s) for s in ("SIGINT", "SIGUSR1") if hasattr(signal, s)]
    saved = {signum: signal.getsignal(signum) for signum in others}

    def stop(frame: Any) -> None:
        tune_handler = signal.getsignal(signal.SIGINT)
        if tune_handler is saved[signal.SIGINT] or not callable(tune_handler):
            _interrupt(frame)  # not Tune's: its loop has not started, or a Ctrl+C stopped it
        tune_handler(signal.SIGINT, frame)  # Tune's: stop the trials, save the experiment, return

    try:
        with _on_sigterm(stop) as terminated:
            yield terminated
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in saved.items():
                signal.signal(signum, handler)
