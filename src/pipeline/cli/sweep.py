"""Labels for a Hydra multirun (`pipeline train -m ...`): a line naming each job's number and
overrides before it runs, and one table of the jobs and their results when the sweep ends.

Hydra's own "Launching 3 jobs / #0 : ..." lines go out with its logging (conf/hydra/), so
this callback (`hydra.callbacks` in conf/config.yaml) says it instead. A job's app hands its
figures over with `record`: Hydra's JobReturn carries only the number a sweeper optimizes.
Jobs run in this process (Hydra's basic launcher); a launcher that runs them elsewhere
leaves their figures blank in the table.
"""

from __future__ import annotations

from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.tracking.links import ui_hint

COLUMNS = ("val/acc", "test/acc")  # the figures a job's row shows, when the job has them

_RESULTS: dict[str, dict[str, Any]] = {}  # a job's output folder -> its figures (`record`)


def in_multirun() -> bool:
    """Whether this Hydra job is one of a multirun's."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record(figures: dict[str, Any]) -> None:
    """This job's figures for the sweep's table: `COLUMNS` it has, `run` (the MLflow run id) and
    `tracking_uri` (its store)."""
    if in_multirun():
        _RESULTS[HydraConfig.get().runtime.output_dir] = figures


class JobTable(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks`): labels a multirun's jobs."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.hint: str | None = None
        self.shared_keys: set[str] = set()
        self.shared: list[str] = []  # the command's overrides that sweep nothing: every job has them
        self.own: dict[int, str] = {}  # each job's own overrides, as its start printed them

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.rows, self.own = [], {}
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        self.shared = [o.input_line for o in parsed if not o.is_sweep_override()]
        self.shared_keys = {o.get_key_element() for o in parsed if not o.is_sweep_override()}

    def _overrides(self, config: DictConfig) -> str:
        """The job's own overrides (what its sweep chose), or all of them if none is its own.
        By key: a job's overrides come back from Hydra re-spelled (`false` as `False`)."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        task = list(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(task)
        own = [line for line, o in zip(task, parsed) if o.get_key_element() not in self.shared_keys]
        return " ".join(own or task) or "(no overrides)"

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self.own[config.hydra.job.num] = self._overrides(config)
            print(f"[job {config.hydra.job.num}] {self.own[config.hydra.job.num]}", flush=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        figures = _RESULTS.pop(config.hydra.runtime.output_dir, {})
        failed = job_return.status == JobStatus.FAILED
        num = config.hydra.job.num
        self.rows.append({"job": str(num), "overrides": self.own.pop(num, None) or self._overrides(config),
                          **{c: _figure(figures.get(c)) for c in COLUMNS},
                          "run": "failed" if failed else figures.get("run") or "-"})
        if figures.get("tracking_uri"):
            self.hint = ui_hint(figures["tracking_uri"])  # the same store for every job, as a rule

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.rows:
            return
        columns = ["job", "overrides", *(c for c in COLUMNS if any(r[c] != "-" for r in self.rows)), "run"]
        widths = {c: max(len(c), *(len(r[c]) for r in self.rows)) for c in columns}
        lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
        lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in self.rows]
        if self.hint:
            lines.append(self.hint)
        title = f"{len(self.rows)} jobs" + (f", each with {' '.join(self.shared)}" if self.shared else "") + ":"
        print("\n".join(["", title, *lines]), flush=True)


def _figure(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
