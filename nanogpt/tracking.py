"""Experiment trackers, picked by the `logger` group. Only rank 0 has one.

wandb is imported only when used (it costs ~0.4 s at start-up). A tracker failure never stops a
run: it warns once, falls back to offline (or to nothing) and training goes on; metrics.jsonl in
the run folder has every record either way.
"""

import logging
import math
from pathlib import Path

from nanogpt.config import LoggerConfig
from nanogpt.rundir import RunInfo

log = logging.getLogger("nanogpt")


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


def build_tracker(cfg: LoggerConfig, config: dict, run: RunInfo, resume_id: str | None) -> WandbTracker | None:
    """The tracker cfg asks for, or None. An online start that fails (no network, no key) falls
    back to offline; one warning says what happened."""
    if cfg.kind != "wandb" or cfg.mode == "disabled":
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
