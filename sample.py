"""Sample text from a trained run or from GPT-2.

    python sample.py                                  # the newest run under outputs/
    python sample.py init_from=outputs/2026-11-25/10-00-00 start="ROMEO:" num_samples=2
    python sample.py init_from=gpt2 start="FILE:prompt.txt"
"""

import gc

gc.disable()  # the imports make ~0.5M objects that live as long as the process: collecting
#                them while they pile up took ~0.5 s of start-up (README, Benchmark)

from pathlib import Path

import hydra
import torch

from nanogpt.checkpoint import find_newest_run, load_model
from nanogpt.cli import job, run_cli
from nanogpt.config import SampleConfig, SystemConfig, to_config
from nanogpt.device import autocast, resolve_device, resolve_dtype
from nanogpt.errors import UserError
from nanogpt.tokenizer import tokenizer_from_meta

gc.freeze()  # ...and no later collection walks them
gc.enable()


def newest_run(runs_root: str) -> str:
    run = find_newest_run(Path(runs_root))
    if run is None:
        raise UserError(f"no runs with a checkpoint under {runs_root}/: train first or pass init_from=<run folder>")
    return str(run)


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
@job
def main(cfg) -> None:
    c: SampleConfig = to_config(cfg)
    system = SystemConfig(device=c.device, dtype=c.dtype)
    device = resolve_device(system)
    ctx = autocast(device, resolve_dtype(system, device))
    torch.manual_seed(c.seed)

    model, meta = load_model(c.init_from or newest_run(c.runs_root))
    tokenizer = tokenizer_from_meta(meta or {"tokenizer": "gpt2"})  # GPT-2 and nanoGPT's checkpoints: GPT-2 BPE
    model.eval().to(device)
    if c.compile:
        model = torch.compile(model)

    start = Path(c.start[5:]).read_text() if c.start.startswith("FILE:") else c.start
    try:
        ids = tokenizer.encode(start)
    except ValueError as e:
        raise UserError(f"the prompt cannot be encoded with this run's vocabulary: {e}") from None
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]
    with torch.no_grad(), ctx:
        for _ in range(c.num_samples):
            y = model.generate(x, c.max_new_tokens, temperature=c.temperature, top_k=c.top_k)
            print(tokenizer.decode(y[0].tolist()))
            print("---------------")


if __name__ == "__main__":
    run_cli(main)
