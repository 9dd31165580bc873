"""Sample text from a trained run or from GPT-2.

    python sample.py                                  # the newest run under outputs/
    python sample.py init_from=outputs/2026-11-25/10-00-00 start="ROMEO:" num_samples=2
    python sample.py init_from=gpt2 start="FILE:prompt.txt" top_p=0.9 stop=["\n\n"]
    python sample.py prompts_file=prompts.txt num_samples=4 format=json
    python sample.py init_from=outputs/2026-11-25/10-00-00 weights=ema   # the EMA of its weights (ema_decay)

Each prompt is prefilled once and its samples decode as one batch through a key/value cache
(nanogpt/sampling.py). On a terminal the first sample streams as it is generated; a file or a
pipe gets whole samples, the same bytes.
"""

import gc

gc.disable()  # the imports make ~0.5M objects that live as long as the process: collecting
#                them while they pile up took ~0.5 s of start-up (docs/benchmark.md)

import sys
from pathlib import Path

import hydra
import torch

from nanogpt.checkpoint import find_newest_run, load_model
from nanogpt.cli import job, run_cli
from nanogpt.config import SampleConfig, SystemConfig, to_config
from nanogpt.device import autocast, resolve_device, resolve_dtype
from nanogpt.errors import UserError
from nanogpt.sampling import Sampling, Texts, generate
from nanogpt.tokenizer import tokenizer_from_meta

gc.freeze()  # ...and no later collection walks them
gc.enable()

def newest_run(runs_root: str) -> str:
    run = find_newest_run(Path(runs_root))
    if run is None:
        raise UserError(f"no runs with a checkpoint under {runs_root}/: train first or pass init_from=<run folder>")
    return str(run)


def read_prompts(c: SampleConfig) -> list[str]:
    """The prompts: prompts_file's lines, or start (FILE:path: that file's text). An empty prompt
    is refused: the model needs a token to start from."""
    if c.prompts_file is not None:
        prompts = _text(c.prompts_file).splitlines()
        if not prompts:
            raise UserError(f"prompts_file={c.prompts_file} holds no prompts (one a line)")
        empty = next((n for n, p in enumerate(prompts, 1) if not p), None)
        if empty:
            raise UserError(f"{c.prompts_file}:{empty}: an empty prompt (each line is one): remove the line")
        return prompts
    prompt = _text(c.start[5:]) if c.start.startswith("FILE:") else c.start
    if not prompt:
        raise UserError(f"start={c.start!r} is an empty prompt: give the model some text to start from, e.g. start='\\n'")
    return [prompt]


def _text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
@job
def main(cfg) -> None:
    c: SampleConfig = to_config(cfg)
    system = SystemConfig(device=c.device, dtype=c.dtype)
    device = resolve_device(system)
    ctx = autocast(device, resolve_dtype(system, device))
    texts = read_prompts(c)  # before the model: a wrong file costs no load

    model, meta = load_model(c.init_from or newest_run(c.runs_root), weights=c.weights, trusted=c.extensions)
    tokenizer = tokenizer_from_meta(meta or {"tokenizer": "gpt2"})  # GPT-2 and nanoGPT's checkpoints: GPT-2 BPE
    model.eval().to(device)
    if c.compile:
        model = torch.compile(model)
    try:
        prompts = [tokenizer.encode(p) for p in texts]
    except ValueError as e:
        raise UserError(f"the prompt cannot be encoded with this run's vocabulary: {e}") from None

    stream = (sys.stdout.isatty() if c.stream is None else c.stream) and c.format == "text"
    stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in c.stop]  # the command line cannot type a newline
    texts = Texts(tokenizer, prompts, stop, stream)
    sampling = Sampling(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, seed=c.seed)
    with ctx:
        rows = generate(model, prompts, c.num_samples, c.max_new_tokens, sampling,
                        stopped=texts.stopped if c.stop else None, on_token=texts.on_token if stream else None)
    texts.write(rows, c.format)


if __name__ == "__main__":
    run_cli(main)
