"""How fast evaluation runs here: HellaSwag examples per second and bits-per-byte tokens per
second for the GPT-2 124M shape, in fp32 and in bf16 autocast (on a CPU, bf16 is faster only where
the cores multiply it natively: `system=cpu_fast` picks it there).

    python scripts/bench_eval.py [--examples 64] [--bpb-tokens 16384] [--out eval_bench.json]

The weights are random (speed does not depend on them) and the examples are HellaSwag-sized
stand-ins cut from Tiny Shakespeare: contexts of ~400 characters, four endings of ~100 (the
official file cannot be downloaded on these machines). Speed is reported, never asserted.
"""

import argparse
import json
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from nanogpt.config import ASSETS, ChoiceTaskConfig
from nanogpt.distributed import DistInfo
from nanogpt.evaluation import bits_per_byte, multiple_choice, render_all
from nanogpt.flops import cpu_has_fast_bf16
from nanogpt.model import GPT, GPTConfig
from nanogpt.shards import TokenStream, write_shard
from nanogpt.tasks import ChoiceTask
from nanogpt.tokenizer import TiktokenTokenizer


def stand_in_examples(n: int, text: str) -> list[dict]:
    rng = random.Random(0)
    piece = lambda k: text[(s := rng.randrange(len(text) - k)) : s + k]  # noqa: E731
    return [{"ctx": piece(400), "endings": [piece(100) for _ in range(4)], "label": rng.randrange(4)} for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--bpb-tokens", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True)).eval()
    tok = TiktokenTokenizer("gpt2")
    text = (ASSETS / "tinyshakespeare.txt").read_text()
    tmp = Path(tempfile.mkdtemp())
    file = tmp / "hellaswag_stand_in.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in stand_in_examples(args.examples, text)))
    task = ChoiceTask(ChoiceTaskConfig(path=str(file), format="hellaswag"), "hellaswag", str(tmp))
    rendered = render_all(task, tok, model.config.block_size)
    tokens = np.asarray(tok.encode(text[: args.bpb_tokens * 5]), dtype=np.uint16)
    write_shard(tmp / "val.bin", tokens, np.array([0]), bytes(32))
    stream = TokenStream([tmp / "val.bin"], bytes(32))
    token_bytes = torch.from_numpy(np.pad(tok.token_bytes(), (0, 50304 - tok.vocab_size)))
    cpu, one = torch.device("cpu"), DistInfo()

    report = {"threads": torch.get_num_threads(), "cpu_has_fast_bf16": cpu_has_fast_bf16(),
              "mean_row_tokens": float(np.mean([len(r) for ex in rendered for r in ex.rows]))}
    for name, ctx in (("fp32", nullcontext()), ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
        multiple_choice(model, rendered[:2], args.batch_size, cpu, ctx, one)  # warm-up
        t = time.perf_counter()
        multiple_choice(model, rendered, args.batch_size, cpu, ctx, one)
        examples_s = len(rendered) / (time.perf_counter() - t)
        t = time.perf_counter()
        _, scored = bits_per_byte(model, stream, token_bytes, args.bpb_tokens, model.config.block_size,
                                  max(1, args.batch_size // 4), cpu, ctx, one)
        report[name] = {"hellaswag_examples_per_s": examples_s, "bpb_tokens_per_s": scored / (time.perf_counter() - t),
                        "full_hellaswag_minutes": 10042 / examples_s / 60}
        print(name, json.dumps(report[name]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
