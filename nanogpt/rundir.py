"""The files of a run folder besides Hydra's: status.json, metrics.jsonl, provenance, .lock.

status.json says whether a run is running (with its pid and host), finished, failed (with the
error) or interrupted; metrics.jsonl holds one JSON object per log or eval event and is the source
of truth for the plots, the run list and the sweep summaries. .lock makes one process the writer
of a folder.
"""

import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from nanogpt.errors import UserError

STATUS, METRICS, LOCK = "status.json", "metrics.jsonl", ".lock"
DEBUG = "debug"  # the debug presets' runs go to outputs/debug/: a search for runs below outputs/ skips it
REQUEUE_WAIT_S = 30  # how long a requeued SLURM job waits for its previous run to let go of the folder


@dataclass
class RunInfo:
    """Where a run writes and what launched it (known in the Hydra process, passed to ranks)."""

    run_dir: str
    job_name: str = "train"
    overrides: list[str] = field(default_factory=list)
    sweep_dir: str | None = None  # set for a job of a multirun
    job_num: int | None = None


_held: dict[Path, list] = {}  # run folder -> [its locked file, holders in this process]


@contextmanager
def writer_lock(run_dir: Path) -> Iterator[None]:
    """One writer per run folder: an flock on <run>/.lock, held while the block runs, naming its
    holder (pid, host, SLURM job). A second process that would write there stops with one line
    naming the holder. The kernel frees the lock when the holder dies, so a crashed run is
    resumable at once; a requeued SLURM job (the same job id) waits for its previous run to exit.
    Re-entrant within a process: the command holds it before Hydra writes into a resumed folder,
    the trainer again around the run."""
    path = Path(run_dir).resolve()
    if path not in _held:
        _held[path] = [_lock(path), 0]
    _held[path][1] += 1
    try:
        yield
    finally:
        _held[path][1] -= 1
        if _held[path][1] == 0:
            _held.pop(path)[0].close()  # closing the file frees the lock


def _lock(path: Path):
    path.mkdir(parents=True, exist_ok=True)
    f = open(path / LOCK, "a+")
    job, deadline = os.environ.get("SLURM_JOB_ID"), time.monotonic() + REQUEUE_WAIT_S
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder(f)
            if job and holder.get("slurm_job_id") == job and time.monotonic() < deadline:
                time.sleep(0.5)  # this job's previous run, requeued: it is on its way out
                continue
            f.close()
            slurm = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
            raise UserError(
                f"{path} is in use by pid {holder.get('pid')} on {holder.get('host')}{slurm}: "
                "a run folder has one writer; wait for that run to end or stop it"
            ) from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": job, "time": time.time()}))
    f.flush()
    return f


def _holder(f) -> dict:
    """Who holds a lock file, as it wrote itself there (it may be writing just now)."""
    for _ in range(20):
        f.seek(0)
        try:
            return json.loads(f.read())
        except ValueError:
            time.sleep(0.05)
    return {}


def pid_alive(pid: int | None) -> bool:
    """Whether a process of this host exists (signal 0 only checks)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return True


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


CARRIED = ("spikes", "last_spike")  # what status.json keeps whatever the status becomes: the run's loss spikes


def write_status(run_dir: Path, status: str, **extra) -> None:
    carried = {k: v for k, v in read_status(run_dir).items() if k in CARRIED}
    write_json_atomic(
        Path(run_dir) / STATUS,
        {"status": status, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), **carried, **extra},
    )


def update_status(run_dir: Path, **fields) -> None:
    """Add fields to status.json as it is (a running run's loss spikes)."""
    write_json_atomic(Path(run_dir) / STATUS, {**read_status(run_dir), **fields, "time": time.time()})


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return {}


class MetricsLog:
    """Appends JSON lines; on resume, first drops the lines past the checkpoint's iteration so
    the file never holds two histories. "iter" counts completed iterations: a train line at
    iter n follows the n-th step, an eval line at n sees the weights after n steps."""

    def __init__(self, run_dir: Path, resume_iter: int | None = None):
        self.path = Path(run_dir) / METRICS
        if resume_iter is not None:
            self._cut(resume_iter)
        self.file = open(self.path, "a")

    def _cut(self, last_iter: int) -> None:
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _iter_of(line) <= last_iter]
            self.path.write_text("".join(line + "\n" for line in kept))

    def rewind(self, last_iter: int) -> None:
        """Drop the lines past last_iter, as a resume from there does (a loss spike's rollback)."""
        self.file.close()
        self._cut(last_iter)
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _iter_of(line: str) -> float:
    try:
        return json.loads(line)["iter"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn last line from a kill: drop it


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a torn last line from a kill
    return records


def source_losses(record: dict) -> dict[str, float]:
    """A mixture's val loss per source of an "eval" record: {"val_loss/<name>": loss}."""
    return {k: v for k, v in record.items() if k.startswith("val_loss/")}


def task_scores(record: dict) -> dict[str, float]:
    """The scores of a "tasks" record (the eval group's metrics, e.g. bpb, hellaswag/acc_norm), not
    its counters."""
    return {k: v for k, v in record.items() if k not in ("iter", "kind", "tokens", "flops", "train_time_s")}


def provenance() -> dict:
    """What produced a run: code version, packages, machine, scheduler job. No environment
    variables: they may hold secrets."""
    src = Path(__file__).resolve().parent.parent

    def git(*args) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=5)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            return None

    versions = {}
    for pkg in ("torch", "numpy", "hydra-core", "omegaconf", "tiktoken"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "versions": versions,
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "argv": sys.argv,
    }


def seconds_since_process_start() -> float | None:
    """Wall time since this process started, interpreter start-up and imports included (Linux)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
