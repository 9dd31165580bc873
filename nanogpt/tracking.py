"""Experiment trackers, picked by the `logger` group. Only rank 0 has one.

wandb is imported only when used (it costs ~0.4 s at start-up). A tracker failure never stops a
run: it warns once, falls back to offline (or to nothing) and training goes on.
"""

import logging
import os
from pathlib import Path

from nanogpt.config import LoggerConfig
from nanogpt.rundir import RunInfo

log = logging.getLogger("nanogpt")


class WandbTracker:
    def __init__(self, cfg: LoggerConfig, config: dict, run: RunInfo, resume_id: str | None):
        import wandb

        self.wandb = wandb
        kwargs = dict(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_name(run),
            group=cfg.group or (Path(run.sweep_dir).name if run.sweep_dir else None),
            tags=list(cfg.tags),
            config=config,
            dir=run.run_dir,
            id=resume_id,
            resume="allow",  # a resumed run continues the same wandb run
        )
        try:
            self.run = wandb.init(mode=cfg.mode, **kwargs)
        except Exception as e:
            if cfg.mode != "online":
                raise
            log.warning(f"wandb could not start online ({type(e).__name__}: {e}); logging offline instead")
            self.run = wandb.init(mode="offline", **kwargs)
        self.run.define_metric("iter")
        self.run.define_metric("*", step_metric="iter")
        self.run_id = self.run.id
        self.failed = False

    def log(self, metrics: dict) -> None:
        if self.failed:
            return
        try:
            self.run.log(metrics)
        except Exception as e:
            self.failed = True
            log.warning(f"wandb logging failed ({type(e).__name__}: {e}); metrics.jsonl still has everything")

    def finish(self, exit_code: int = 0) -> None:
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:
            log.warning(f"wandb finish failed ({type(e).__name__}: {e})")


def run_name(run: RunInfo) -> str:
    """The job name and its overrides, e.g. 'train optim.learning_rate=3e-4'."""
    return " ".join([run.job_name, *run.overrides]) if run.overrides else f"{run.job_name} {Path(run.run_dir).name}"


def build_tracker(cfg: LoggerConfig, config: dict, run: RunInfo, resume_id: str | None):
    if cfg.kind != "wandb" or cfg.mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        return WandbTracker(cfg, config, run, resume_id)
    except Exception as e:
        log.warning(f"wandb is off for this run ({type(e).__name__}: {e}); metrics.jsonl still has everything")
        return None
