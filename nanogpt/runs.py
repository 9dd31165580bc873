"""Find runs: which finished, which stopped and can be resumed, which was best.

    python -m nanogpt.runs                    # every run under outputs/ and multirun/
    python -m nanogpt.runs multirun/2026-11-25

    started           status       iters      best val  folder                       overrides
    2026-11-25 10:00  finished     2000/2000  1.8860    outputs/2026-11-25/10-00-00  model=baby
    2026-11-25 11:02  interrupted  750/2000   2.3104    multirun/2026-11-25/11-02-13/1  optim.learning_rate=1e-3

A run folder is any folder where Hydra saved a job (.hydra/); everything shown comes from its
files: status.json, metrics.jsonl, .hydra/overrides.yaml and .hydra/config.yaml. Debug runs
(outputs/debug/) are listed when their folder is named: python -m nanogpt.runs outputs/debug
"""

import argparse
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from nanogpt.rundir import DEBUG, pid_alive, read_metrics, read_status

DEFAULT_FOLDERS = ("outputs", "multirun")
SKIP = {".hydra", ".submitit", "wandb", "tensorboard", DEBUG}  # hold no runs, or debug runs: listed only when named


@dataclass
class Run:
    folder: Path
    started: float  # when Hydra created the folder: the first start, also for a resumed run
    status: str  # running | finished | failed | interrupted | crashed | unknown (no status.json)
    iters: int  # the last iteration in metrics.jsonl
    max_iters: int | None
    best_val_loss: float | None
    overrides: list[str]


def find_runs(folders: list[Path]) -> list[Run]:
    """Every run folder under folders (or the folders themselves), oldest first."""
    found = []
    for top in folders:
        for here, dirs, _ in os.walk(top):
            if ".hydra" in dirs:
                found.append(describe(Path(here)))
                dirs.clear()  # a run folder holds no other runs
            dirs[:] = sorted(d for d in dirs if d not in SKIP)
    return sorted(found, key=lambda r: r.started)


def describe(run_dir: Path) -> Run:
    metrics = read_metrics(run_dir)
    val = [m["val_loss"] for m in metrics if m.get("kind") == "eval" and math.isfinite(m["val_loss"])]
    config = run_dir / ".hydra" / "config.yaml"
    return Run(
        folder=run_dir,
        started=(run_dir / ".hydra").stat().st_mtime,  # a resume rewrites the files, not the folder
        status=status(run_dir),
        iters=max((m["iter"] for m in metrics), default=0),
        max_iters=OmegaConf.load(config).get("max_iters") if config.exists() else None,
        best_val_loss=min(val) if val else None,
        overrides=overrides(run_dir),
    )


def status(run_dir: Path) -> str:
    """status.json's word, except that a run whose process is gone from this host is 'crashed'
    (killed: SIGKILL, out of memory, a lost node); a run on another host is taken at its word."""
    s = read_status(run_dir)
    if s.get("status") == "running" and s.get("host") == socket.gethostname() and not pid_alive(s.get("pid")):
        return "crashed"
    return s.get("status", "unknown")


def overrides(run_dir: Path) -> list[str]:
    """The run's command-line overrides, the last one per key (a resumed run repeats keys)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    by_key = {}
    for o in OmegaConf.load(path) if path.exists() else []:
        key = str(o).split("=", 1)[0]
        by_key.pop(key, None)  # the latest value, at the latest position
        by_key[key] = str(o)
    return list(by_key.values())


def format_runs(runs: list[Run]) -> str:
    """A plain-text table, one run a line."""
    table = [["started", "status", "iters", "best val", "folder", "overrides"]]
    for r in runs:
        table.append([
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started)),
            r.status,
            f"{r.iters}/{r.max_iters}" if r.max_iters is not None else str(r.iters),
            "-" if r.best_val_loss is None else f"{r.best_val_loss:.4f}",
            _show(r.folder),
            " ".join(r.overrides),
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]).rstrip() for row in table)


def _show(folder: Path) -> str:
    """Relative to the working directory when under it: shorter, and what the user typed."""
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanogpt.runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path, help=f"where to look (default: {' and '.join(DEFAULT_FOLDERS)})")
    args = parser.parse_args(argv)
    folders = args.folders or [Path(f) for f in DEFAULT_FOLDERS]
    runs = find_runs(folders)
    print(format_runs(runs) if runs else f"no runs under {', '.join(map(str, folders))}")


if __name__ == "__main__":
    main()
