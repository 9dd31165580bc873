"""Experiment trackers, picked by the `logger` group: a set of named trackers (logger=[wandb,...]).

Each tracker is one `start_*` function, named by its config's `_target_`, that returns an object
with `run_id` (kept in the checkpoint, so a resumed run continues the same tracker run), `log` and
`finish`, or None when it cannot start. It is called with the composed config, the run, its
tracker's saved run id and the iteration a resumed run continues from. Only rank 0 has trackers.
Every tracker gets every record of metrics.jsonl. A tracker failure never stops a run: it warns
once, falls back (wandb: to offline, then to nothing) and training goes on; metrics.jsonl in the
run folder has every record either way.

Adding a tracker: a start function and its class here, a schema in nanogpt/config.py, a YAML in
conf/logger/ with `# @package logger.<name>`.
"""

import logging
import math
from pathlib import Path
from typing import Protocol

from nanogpt.config import TensorBoardConfig, WandbConfig, build
from nanogpt.rundir import MetricsLog, RunInfo

log = logging.getLogger("nanogpt")


class Tracker(Protocol):
    run_id: str | None

    def log(self, record: dict) -> None: ...

    def finish(self, exit_code: int, summary: dict) -> None: ...


class Recorder:
    """Where a run's records go: metrics.jsonl, then every tracker. Ranks other than 0 get an
    empty one, which records nothing."""

    def __init__(self, metrics: MetricsLog | None = None, trackers: dict[str, Tracker] | None = None):
        self.metrics, self.trackers = metrics, trackers or {}

    def log(self, record: dict) -> None:
        if self.metrics:
            self.metrics.write(record)
        for tracker in self.trackers.values():
            tracker.log(record)

    def rewind(self, last_iter: int) -> None:
        """metrics.jsonl back to last_iter (a rollback); trackers keep what they were sent: the
        iterations trained again are sent again."""
        if self.metrics:
            self.metrics.rewind(last_iter)

    def run_ids(self) -> dict[str, str]:
        return {name: t.run_id for name, t in self.trackers.items() if t.run_id is not None}

    def finish(self, exit_code: int, summary: dict) -> None:
        if self.metrics:
            self.metrics.close()
        for tracker in self.trackers.values():
            tracker.finish(exit_code, summary)


def start_trackers(configs: dict, *, config: dict, run: RunInfo, resume_ids: dict[str, str],
                   resume_iter: int | None = None) -> dict[str, Tracker]:
    """Start each tracker of the `logger` group; those that cannot start are left out."""
    started = {name: build(c, config=config, run=run, resume_id=resume_ids.get(name), resume_iter=resume_iter)
               for name, c in configs.items()}
    return {name: t for name, t in started.items() if t is not None}


class WandbTracker:
    """A started wandb run: log() takes metrics.jsonl records, with "iter" as the step metric."""

    def __init__(self, run):
        self.run = run
        self.run_id = run.id  # kept in the checkpoint, so a resumed run continues this one
        self.failed = False
        # charts against our iteration rather than log(step=it): a resumed run re-logs the
        # iterations after its checkpoint, and wandb drops a step lower than one it has seen
        run.define_metric("iter")
        run.define_metric("*", step_metric="iter")

    def log(self, record: dict) -> None:
        if self.failed:
            return
        try:
            self.run.log({k: v for k, v in record.items() if k != "kind"})  # kind: the keys say it
        except Exception as e:
            self.failed = True
            log.warning(f"wandb logging failed ({type(e).__name__}: {e}); metrics.jsonl still has everything")

    def finish(self, exit_code: int = 0, summary: dict | None = None) -> None:
        """End the run; summary adds values wandb's last-logged ones don't give (best_val_loss)."""
        try:
            for k, v in (summary or {}).items():
                if not (isinstance(v, float) and not math.isfinite(v)):  # inf: no eval happened
                    self.run.summary[k] = v
            self.run.finish(exit_code=exit_code)
        except Exception as e:
            log.warning(f"wandb finish failed ({type(e).__name__}: {e})")


def run_name(run: RunInfo) -> str:
    """The job name and its overrides, e.g. 'train optim.learning_rate=3e-4'."""
    return " ".join([run.job_name, *run.overrides]) if run.overrides else f"{run.job_name} {Path(run.run_dir).name}"


def start_wandb(cfg: WandbConfig, *, config: dict, run: RunInfo, resume_id: str | None,
                resume_iter: int | None = None) -> WandbTracker | None:
    """A wandb run, or None. An online start that fails (no network, no key) falls back to
    offline; one warning says what happened. A resumed run continues by its id (resume_iter is
    not needed: charts follow "iter", and re-logged iterations replace the killed run's)."""
    if cfg.mode == "disabled":
        return None
    try:
        import wandb
    except Exception as e:  # declared, but a broken install must not stop a run
        log.warning(f"wandb is off for this run ({type(e).__name__}: {e}); metrics.jsonl still has everything")
        return None
    kwargs = dict(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name or run_name(run),
        # the sweep folder's last two parts, e.g. 2026-11-25/10-00-00
        group=cfg.group or ("/".join(Path(run.sweep_dir).parts[-2:]) if run.sweep_dir else None),
        tags=list(cfg.tags),
        config=config,
        dir=run.run_dir,  # its files live in <run folder>/wandb
        id=resume_id,
        resume="allow" if resume_id else None,
        settings=wandb.Settings(silent=True),  # our own line below says where the run is
    )
    errors = {}
    for mode in dict.fromkeys([cfg.mode, "offline"]):
        try:
            tracker = WandbTracker(wandb.init(mode=mode, **kwargs))
        except Exception as e:
            errors[mode] = f"{type(e).__name__}: {e}"
            continue
        if errors:
            log.warning(f"wandb could not start {cfg.mode} ({errors[cfg.mode]}); logging offline instead")
        if tracker.run.offline:
            log.info(f"wandb run {tracker.run_id} is offline; upload it with: wandb sync {tracker.run.settings.sync_dir}")
        else:
            log.info(f"wandb run {tracker.run_id}: {tracker.run.url}")
        return tracker
    log.warning(f"wandb is off for this run ({'; '.join(f'{m}: {e}' for m, e in errors.items())}); metrics.jsonl still has everything")
    return None


class TensorBoardTracker:
    """A SummaryWriter: each record's numbers as scalars named <kind>/<key> (train/loss,
    eval/val_loss) at step "iter", the config as hyper-parameters."""

    run_id = None  # the run folder holds its event files: nothing to continue by id

    def __init__(self, writer):
        self.writer = writer
        self.failed = False

    def log(self, record: dict) -> None:
        if self.failed:
            return
        try:
            for key, value in record.items():
                if key not in ("iter", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["iter"])
            self.writer.flush()  # seen at once in TensorBoard, and a killed run keeps what it logged
        except Exception as e:
            self.failed = True
            log.warning(f"TensorBoard logging failed ({type(e).__name__}: {e}); metrics.jsonl still has everything")

    def finish(self, exit_code: int = 0, summary: dict | None = None) -> None:
        try:
            self.writer.close()
        except Exception as e:
            log.warning(f"TensorBoard close failed ({type(e).__name__}: {e})")


def start_tensorboard(cfg: TensorBoardConfig, *, config: dict, run: RunInfo, resume_id: str | None,
                      resume_iter: int | None) -> TensorBoardTracker | None:
    """A SummaryWriter in <run folder>/tensorboard, or None when it cannot start (tensorboard not
    installed, the folder not writable). Opened with purge_step: TensorBoard drops the events the
    folder holds from that step on, which a killed run logged after its checkpoint and its resume
    logs again."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        # metrics.jsonl keeps a resumed run's records up to its checkpoint's iteration, included
        purge_step = 0 if resume_iter is None else resume_iter + 1
        writer = SummaryWriter(str(Path(run.run_dir) / "tensorboard"), purge_step=purge_step)
        if resume_iter is None:
            write_hparams(writer, config)
    except Exception as e:
        hint = ": pip install -e '.[tensorboard]'" if isinstance(e, ImportError) else ""
        log.warning(f"TensorBoard is off for this run ({type(e).__name__}: {e}){hint}; metrics.jsonl still has everything")
        return None
    log.info(f"TensorBoard: tensorboard --logdir {writer.log_dir}")
    return TensorBoardTracker(writer)


def write_hparams(writer, config: dict) -> None:
    """The config, flattened (model.n_layer, optim.learning_rate, ...), into the writer's own run
    (SummaryWriter.add_hparams would make a run folder of its own), tied to the val loss."""
    from torch.utils.tensorboard.summary import hparams

    flat = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif value is not None:
                flat[prefix + key] = value if isinstance(value, (bool, int, float, str)) else str(value)

    walk(config, "")
    for summary in hparams(flat, {"eval/val_loss": None}):
        writer.file_writer.add_summary(summary)
