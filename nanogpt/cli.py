"""What the command-line scripts share: resuming by folder, launching ranks, reporting errors.

Errors of ours (UserError) are raised inside the job function, so a multirun records that job
as failed and goes on; for a single run they become one line on stderr and exit status 2 here,
outside the job, as do Hydra's own complaints about its command line. A signal-stopped run exits
with 128 + the signal's number.
"""

import os
import sys
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from functools import wraps
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nanogpt import distributed
from nanogpt.config import BUILDERS
from nanogpt.errors import Interrupted, UserError
from nanogpt.rundir import RunInfo, writer_lock


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


def expand_resume(argv: list[str]) -> tuple[list[str], Path | None]:
    """`resume=<run folder>` -> that run's own overrides, then the new ones, in that folder; and
    the folder. A run folder may come from someone else: its overrides are data, so any that would
    change Hydra's own settings or name a `_target_` other than nanogpt's builders is refused."""
    resume = [a for a in argv[1:] if a.startswith("resume=")]
    if not resume:
        return argv, None
    run_dir = Path(resume[-1].split("=", 1)[1]).expanduser()
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.exists():
        raise UserError(f"{run_dir} is not a run folder (no .hydra/overrides.yaml)")
    old = [str(o) for o in OmegaConf.load(saved)]
    for override in old:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or (key.endswith("_target_") and value not in BUILDERS):
            raise UserError(f"{saved} holds {override!r}, which would run code of its own choosing: refused")
    new = [a for a in argv[1:] if not a.startswith("resume=")]
    return [argv[0], *old, *new, f"hydra.run.dir={run_dir}"], run_dir


def run_cli(main: Callable[[], object], conf_dir: Path | None = None, follower: Callable | None = None,
            config_name: str = "config") -> None:
    """Call a @hydra.main function as a command. Under torchrun, ranks other than 0 compose the
    same config with Hydra's compose API and call follower: no run folder or logs of their own."""
    try:
        sys.argv, resumed = expand_resume(sys.argv)
        if follower is not None and distributed.torchrun_env() and int(os.environ["RANK"]) > 0:
            from hydra import compose, initialize_config_dir

            with initialize_config_dir(config_dir=str(Path(conf_dir).absolute()), version_base="1.3"):
                cfg = compose(config_name=config_name, overrides=sys.argv[1:])
            follower(cfg)
        else:
            # a resumed folder is claimed before Hydra writes its config and log into it
            with writer_lock(resumed) if resumed else nullcontext():
                main()
    except (ReportedError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:
        if not raised_by_hydra(e):
            raise
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(128 + e.signum)


def raised_by_hydra(e: BaseException) -> bool:
    """Whether Hydra itself raised e about its command line (e.g. -m with --cfg), before any job:
    the innermost frame is Hydra's (a job's errors reach run_cli only as ReportedError)."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and f"{os.sep}hydra{os.sep}" in frames[-1].filename
