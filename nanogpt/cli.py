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

from nanogpt import distributed, transfer
from nanogpt.config import BUILDERS
from nanogpt.errors import Interrupted, UserError
from nanogpt.rundir import RunInfo, writer_lock
from nanogpt.targets import covered, override_targets


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


def expand_resume(argv: list[str], conf_dir: Path | None = None, config_name: str = "config") -> tuple[list[str], Path | None]:
    """`resume=<run folder>` -> that run's own overrides, then the new ones, in that folder; and
    the folder. A run folder may come from someone else: its overrides are data. One that would
    change Hydra's own settings is refused; one naming a `_target_` other than nanogpt's builders
    is refused unless the current command lists its package in `extensions` (nanogpt.targets);
    a saved `extensions` does not count. A run made with --config-dir/--config-name needs the same."""
    resume = [a for a in argv[1:] if a.startswith("resume=")]
    if not resume:
        return argv, None
    run_dir = Path(resume[-1].split("=", 1)[1]).expanduser()
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.exists():
        raise UserError(f"{run_dir} is not a run folder (no .hydra/overrides.yaml)")
    new = [a for a in argv[1:] if not a.startswith("resume=")]
    same_config_folders(run_dir, new, config_name)
    old = [str(o) for o in OmegaConf.load(saved) if _key(str(o)) != "extensions"]  # counts from this command only
    flags, ours = split_flags(new)
    foreign = foreign_code(saved, old)
    if foreign:
        plain = [o for o in old if o not in foreign]
        extensions = command_extensions([argv[0], *flags, *plain, *ours], conf_dir, config_name)
        for override, targets in foreign.items():
            if not all(covered(t, extensions) for t in targets):
                raise UserError(f"{saved} holds {override!r}, which would run code of its own choosing: refused; if "
                                f"that code is yours, add extensions=[{targets[0].split('.')[0]}] to the command")
    return [argv[0], *flags, *old, *ours, f"hydra.run.dir={run_dir}"], run_dir


def foreign_code(saved: Path, overrides: list[str]) -> dict[str, list[str]]:
    """The saved overrides that name targets other than nanogpt's builders, with those targets;
    one that changes Hydra's settings, or holds `_target_` text that cannot be read, is refused."""
    foreign = {}
    for override in overrides:
        key = _key(override)
        try:
            targets = override_targets(override)
        except ValueError:
            targets = None
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or targets is None:
            raise UserError(f"{saved} holds {override!r}, which would run code of its own choosing: refused")
        if any(t not in BUILDERS for t in targets):
            foreign[override] = [t for t in targets if t not in BUILDERS]
    return foreign


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (--config-dir x, -m, ...) and the overrides of a command line, in order:
    Hydra reads the flags first, then one run of overrides."""
    overrides = iter(hydra_args(args).overrides)
    flags, ours, following = [], [], next(overrides, None)
    for arg in args:
        if arg == following:
            ours.append(arg)
            following = next(overrides, None)
        else:
            flags.append(arg)
    return flags, ours


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def same_config_folders(run_dir: Path, args: list[str], config_name: str) -> None:
    """A run composed from a config folder of its command (--config-dir) or another primary config
    (--config-name) resumes only with the same: its options live there."""
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_yaml.is_file():
        return
    hydra = OmegaConf.load(hydra_yaml).hydra
    parsed = hydra_args(args)
    had = [s.path for s in hydra.runtime.config_sources if s.provider == "command-line"]
    given = [os.path.abspath(parsed.config_dir)] if parsed.config_dir else []
    for folder in had:
        if folder not in given:
            raise UserError(f"{run_dir} was made with --config-dir {folder}: resume with the same "
                            f"(python {Path(sys.argv[0]).name} --config-dir {folder} resume={run_dir})")
    name = OmegaConf.select(hydra, "job.config_name", default=None)
    if name and name != (parsed.config_name or config_name):
        raise UserError(f"{run_dir} was made with --config-name {name}: resume with the same")


def hydra_args(args: list[str]):
    """Hydra's own reading of a command line's arguments (--config-dir, --config-name, overrides)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(args)


def command_extensions(argv: list[str], conf_dir: Path | None, config_name: str) -> list[str]:
    """`extensions` as the command composes it (its command line and config files)."""
    if conf_dir is not None:
        try:
            return list(compose_command(argv, conf_dir, config_name).get("extensions") or [])
        except Exception:  # noqa: BLE001 - what does not compose names nothing: Hydra's main says why
            pass
    typed = [a.partition("=")[2] for a in argv[1:] if _key(a) == "extensions"]
    return [m.strip(" []'\"") for m in typed[-1].split(",")] if typed else []


def compose_command(argv: list[str], conf_dir: Path, config_name: str) -> DictConfig:
    """The config a command line composes, as @hydra.main composes it, --config-dir and
    --config-name included, through Hydra's compose API (no run folder, no logs)."""
    from hydra import compose, version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    args = hydra_args(argv[1:])
    version.setbase("1.3")
    search_path = create_config_search_path(str(Path(conf_dir).absolute()))
    if args.config_dir:  # where @hydra.main puts it: after conf/, before the schemas
        search_path.prepend(provider="command-line", path=f"file://{os.path.abspath(args.config_dir)}",
                            anchor=SearchPathQuery(provider="schema"))
    Hydra.create_main_hydra2(task_name=Path(argv[0]).stem, config_search_path=search_path)
    try:
        return compose(config_name=args.config_name or config_name, overrides=args.overrides)
    finally:
        GlobalHydra.instance().clear()


def run_cli(main: Callable[[], object], conf_dir: Path | None = None, follower: Callable | None = None,
            config_name: str = "config") -> None:
    """Call a @hydra.main function as a command. Under torchrun, ranks other than 0 compose the
    same config with Hydra's compose API and call follower: no run folder or logs of their own."""
    try:
        sys.argv, resumed = expand_resume(sys.argv, conf_dir, config_name)
        if not resumed and any(a.startswith(f"{transfer.KEY}=") for a in sys.argv[1:]):
            flags, ours = split_flags(sys.argv[1:])
            sys.argv = [sys.argv[0], *flags, *transfer.transfer_overrides(ours), *ours]
        if follower is not None and distributed.torchrun_env() and int(os.environ["RANK"]) > 0:
            follower(compose_command(sys.argv, conf_dir, config_name))
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
