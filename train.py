"""Train a GPT.

    python train.py                                   # the CPU recipe on the shipped Shakespeare
    python train.py model=gpt2_small data=shakespeare_char
    python train.py -m optim.learning_rate=3e-4,6e-4  # a sweep; add hydra/launcher=submitit_slurm
    python train.py resume=outputs/2026-11-25/10-00-00
    torchrun --standalone --nproc_per_node=2 train.py system.device=cpu
"""

import gc

gc.disable()  # the imports make ~0.5M objects that live as long as the process: collecting
#                them while they pile up took ~0.5 s of start-up (docs/benchmark.md)

from pathlib import Path

import hydra
from omegaconf import DictConfig

from nanogpt.cli import job, run_cli, run_info_from_hydra
from nanogpt.config import to_train_config
from nanogpt.rundir import RunInfo
from nanogpt.sweep import write_pending
from nanogpt.trainer import launch

gc.freeze()  # ...and no later collection walks them
gc.enable()

CONF = Path(__file__).parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@job
def main(cfg: DictConfig) -> float:
    return launch(to_train_config(cfg), run_info_from_hydra())


def follow(cfg: DictConfig) -> float:
    """torchrun ranks 1..N-1: rank 0 tells them the run folder."""
    return launch(to_train_config(cfg), RunInfo(run_dir=""))


if __name__ == "__main__":
    try:
        run_cli(main, CONF, follow)
    finally:
        write_pending()  # the sweep summary: Hydra skips on_multirun_end when a job failed
