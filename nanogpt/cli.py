"""What the command-line scripts share: resuming by folder, launching ranks, reporting errors.

Errors of ours (UserError) are raised inside the job function, so a multirun records that job
as failed and goes on; for a single run they become one line on stderr and exit status 2 here,
outside the job. A signal-stopped run exits with 128 + the signal's number.
"""

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nanogpt import distributed
from nanogpt.errors import Interrupted, UserError
from nanogpt.rundir import RunInfo


class ReportedError(BaseException):
    """A UserError of a single (non-sweep) run, on its way out of Hydra to run_cli.
    A BaseException so that Hydra's own reporting, which prints tracebacks, lets it pass."""


def job(fn: Callable) -> Callable:
    """Decorate a Hydra task function: UserError ends a single run with one line."""

    @wraps(fn)
    def wrapper(cfg: DictConfig):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        try:
            return fn(cfg)
        except UserError as e:
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            raise ReportedError(str(e)) from None

    return wrapper


def run_info_from_hydra() -> RunInfo:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return RunInfo(
        run_dir=hc.runtime.output_dir,
        job_name=hc.job.name,
        overrides=list(hc.overrides.task),
        sweep_dir=str(Path(hc.sweep.dir).absolute()) if multirun else None,
        job_num=hc.job.num if multirun else None,
    )


def expand_resume(argv: list[str]) -> list[str]:
    """`resume=<run folder>` -> that run's own overrides, then the new ones, in that folder."""
    resume = [a for a in argv[1:] if a.startswith("resume=")]
    if not resume:
        return argv
    run_dir = Path(resume[-1].split("=", 1)[1]).expanduser()
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.exists():
        print(f"error: {run_dir} is not a run folder (no .hydra/overrides.yaml)", file=sys.stderr)
        sys.exit(2)
    old = [str(o) for o in OmegaConf.load(saved)]
    new = [a for a in argv[1:] if not a.startswith("resume=")]
    return [argv[0], *old, *new, f"hydra.run.dir={run_dir}"]


def run_cli(main: Callable[[], object], conf_dir: Path | None = None, follower: Callable | None = None) -> None:
    """Call a @hydra.main function as a command. Under torchrun, ranks other than 0 compose the
    same config with Hydra's compose API and call follower: no run folder or logs of their own."""
    sys.argv = expand_resume(sys.argv)
    try:
        if follower is not None and distributed.torchrun_env() and int(os.environ["RANK"]) > 0:
            from hydra import compose, initialize_config_dir

            with initialize_config_dir(config_dir=str(Path(conf_dir).absolute()), version_base="1.3"):
                cfg = compose(config_name="config", overrides=sys.argv[1:])
            try:
                follower(cfg)
            except UserError as e:
                raise ReportedError(str(e)) from None
        else:
            main()
    except ReportedError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(128 + e.signum)
