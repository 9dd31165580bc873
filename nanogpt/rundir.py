"""The files of a run folder besides Hydra's: status.json, metrics.jsonl and provenance.

status.json says whether a run is running (with its pid and host), finished, failed (with the
error) or interrupted; metrics.jsonl holds one JSON object per log or eval event and is the source
of truth for the plots, the run list and the sweep summaries.
"""

import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

STATUS, METRICS = "status.json", "metrics.jsonl"


@dataclass
class RunInfo:
    """Where a run writes and what launched it (known in the Hydra process, passed to ranks)."""

    run_dir: str
    job_name: str = "train"
    overrides: list[str] = field(default_factory=list)
    sweep_dir: str | None = None  # set for a job of a multirun
    job_num: int | None = None


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_status(run_dir: Path, status: str, **extra) -> None:
    write_json_atomic(
        Path(run_dir) / STATUS,
        {"status": status, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), **extra},
    )


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
        if resume_iter is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _iter_of(line) <= resume_iter]
            self.path.write_text("".join(line + "\n" for line in kept))
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
