"""How fast multiple-choice scoring runs, side by side, on HellaSwag-sized rows and the GPT-2 124M
shape in fp32: today's scoring path (each context read once, nanogpt/scoring.py), the path it
replaced (every choice's row read whole: the context once per choice), lm-eval's Hugging Face
backend on the same model exported with nanogpt.export, and our lm-eval model on the same requests.

    python scripts/bench_eval.py [--examples 16] [--rounds 3] [--threads 1] [--out eval_bench.json]
    python scripts/bench_eval.py --rounds 0 --examples 48 --bpb-tokens 12288   # fp32 vs bf16, and bpb

The methods run in turn within each round, the rounds alternate, and the medians are compared:
on a shared machine the others' load then falls on every method alike. Each method's scores are
compared with its peer's (the largest difference is reported). The weights are random
(speed does not depend on them); the examples are stand-ins cut from Tiny Shakespeare: contexts of
~400 characters (~100 tokens), four endings of ~100 (~25 tokens). Speed is reported, never asserted.
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from nanogpt.checkpoint import save_checkpoint
from nanogpt.config import ASSETS, ChoiceTaskConfig
from nanogpt.device import malloc_policy
from nanogpt.distributed import DistInfo
from nanogpt.evaluation import bits_per_byte, multiple_choice, render_all
from nanogpt.export import export
from nanogpt.flops import cpu_has_fast_bf16
from nanogpt.model import GPT, GPTConfig
from nanogpt.scoring import token_losses
from nanogpt.shards import TokenStream, write_shard
from nanogpt.tasks import ChoiceTask
from nanogpt.tokenizer import TiktokenTokenizer

CPU, ONE = torch.device("cpu"), DistInfo()


def stand_in_examples(n: int, text: str) -> list[dict]:
    rng = random.Random(0)
    piece = lambda k: text[(s := rng.randrange(len(text) - k)) : s + k]  # noqa: E731
    return [{"ctx": piece(400), "endings": [piece(100) for _ in range(4)], "label": rng.randrange(4)} for _ in range(n)]


def rows_whole(model, rendered, batch_size: int) -> list[float]:
    """The scoring this project had before shared contexts: every (context + choice) row a row of
    a batch, longest first, right-padded; the summed loss of each choice."""
    rows = [(tokens, start) for ex in rendered for tokens, start in zip(ex.rows, ex.starts)]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [0.0] * len(rows)
    for b in range(0, len(order), batch_size):
        group = order[b : b + batch_size]
        x = torch.zeros(len(group), max(len(rows[i][0]) - 1 for i in group), dtype=torch.long)
        y = torch.full_like(x, -1)
        for j, i in enumerate(group):
            tokens, start = rows[i]
            x[j, : len(tokens) - 1] = torch.from_numpy(tokens[:-1])
            y[j, start - 1 : len(tokens) - 1] = torch.from_numpy(tokens[start:])
        for j, loss in zip(group, token_losses(model, x, y).double().sum(1).tolist()):
            out[j] = loss
    return out


def shared(model, rendered, batch_size: int) -> list[float]:
    result = multiple_choice(model, rendered, batch_size, CPU, nullcontext(), ONE)
    return [loss for i in range(len(rendered)) for loss, _ in result.scores[i]]


def hf_backend(folder: Path, batch_size: int):
    """lm-eval's Hugging Face backend on the exported model: the negated log-likelihood of each request."""
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=batch_size)
    return lambda requests: [-ll for ll, _ in hf.loglikelihood(requests, disable_tqdm=True)]


def our_lm(model, tokenizer, batch_size: int):
    from nanogpt.harness import NanoGPTLM

    lm = NanoGPTLM(model, tokenizer, batch_size)
    return lambda requests: [-ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]


def compare(model, tok, rows: list[dict], rendered, args, tmp: Path) -> dict:
    """Alternating rounds of every method on the same examples; medians, ratios and differences."""
    from lm_eval.api.instance import Instance

    save_checkpoint({"model": model.state_dict(), "model_args": vars(model.config), "meta": {"tokenizer": "gpt2"}},
                    tmp / "ckpt.pt")
    export(tmp / "ckpt.pt", tmp / "hf")
    requests = [Instance("loglikelihood", {}, (r["ctx"], " " + e), i) for i, r in enumerate(rows) for e in r["endings"]]
    t = time.perf_counter()
    hf = hf_backend(tmp / "hf", args.batch_size)
    startup = time.perf_counter() - t
    ours = our_lm(model, tok, args.batch_size)
    methods = {  # each scores the first n examples
        "replaced (every row whole)": lambda n: rows_whole(model, rendered[:n], args.batch_size),
        "shared context (today)": lambda n: shared(model, rendered[:n], args.batch_size),
        "lm-eval hf backend": lambda n: hf(requests[: 4 * n]),
        "lm-eval nanogpt model": lambda n: ours(requests[: 4 * n]),
    }
    for run in methods.values():  # warm-up: first calls allocate and load kernels
        run(1)
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    scores = {}
    for r in range(args.rounds):
        for name, run in (methods.items() if r % 2 == 0 else reversed(methods.items())):
            t = time.perf_counter()
            scores[name] = run(len(rows))
            seconds[name].append(time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{n} {s[-1]:.1f} s" for n, s in seconds.items()), flush=True)
    # each path against its peer: our task path against the one it replaced, our lm-eval model
    # against lm-eval's backend (lm-eval's tokenisation of a request differs from our task's where a
    # context ends in whitespace, so the two pairs are not compared with each other)
    peer = {"replaced (every row whole)": "shared context (today)", "shared context (today)": "replaced (every row whole)",
            "lm-eval hf backend": "lm-eval nanogpt model", "lm-eval nanogpt model": "lm-eval hf backend"}
    out = {"hf_backend_startup_s": startup, "examples": len(rows)}
    for name, s in seconds.items():
        out[name] = {"seconds": s, "examples_per_s": len(rows) / statistics.median(s),
                     "max_abs_difference_from_" + peer[name]: max(abs(a - b) for a, b in zip(scores[name], scores[peer[name]]))}
    today = out["shared context (today)"]["examples_per_s"]
    out["today_vs_replaced"] = today / out["replaced (every row whole)"]["examples_per_s"]
    out["today_vs_hf_backend"] = today / out["lm-eval hf backend"]["examples_per_s"]
    out["our_lm_vs_hf_backend"] = out["lm-eval nanogpt model"]["examples_per_s"] / out["lm-eval hf backend"]["examples_per_s"]
    return out


def dtypes(model, tok, rendered, args, tmp: Path) -> dict:
    """Examples/s of the shared-context path and bits-per-byte tokens/s, fp32 and bf16 autocast."""
    text = (ASSETS / "tinyshakespeare.txt").read_text()
    tokens = np.asarray(tok.encode(text[: args.bpb_tokens * 5]), dtype=np.uint16)
    write_shard(tmp / "val.bin", tokens, np.array([0]), bytes(32))
    stream = TokenStream([tmp / "val.bin"], bytes(32))
    token_bytes = torch.from_numpy(np.pad(tok.token_bytes(), (0, 50304 - tok.vocab_size)))
    out = {}
    for name, ctx in (("fp32", nullcontext()), ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
        multiple_choice(model, rendered[:2], args.batch_size, CPU, ctx, ONE)  # warm-up
        t = time.perf_counter()
        multiple_choice(model, rendered, args.batch_size, CPU, ctx, ONE)
        examples_s = len(rendered) / (time.perf_counter() - t)
        t = time.perf_counter()
        _, scored = bits_per_byte(model, stream, token_bytes, args.bpb_tokens, model.config.block_size,
                                  max(1, args.batch_size // 4), CPU, ctx, ONE)
        out[name] = {"hellaswag_examples_per_s": examples_s, "bpb_tokens_per_s": scored / (time.perf_counter() - t),
                     "full_hellaswag_minutes": 10042 / examples_s / 60}
        print(name, json.dumps(out[name]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side rounds; 0: skip the comparison")
    parser.add_argument("--bpb-tokens", type=int, default=0, help=">0: also fp32 vs bf16 speeds and bits per byte")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch's threads (default: its own choice); 1 is least disturbed by load")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_policy(keep_freed=True)  # as the eval command runs on a CPU (system.cpu_memory_cache): freed memory reused
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True)).eval()
    tok = TiktokenTokenizer("gpt2")
    tmp = Path(tempfile.mkdtemp())
    rows = stand_in_examples(args.examples, (ASSETS / "tinyshakespeare.txt").read_text())
    (tmp / "hellaswag_stand_in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = ChoiceTask(ChoiceTaskConfig(path=str(tmp / "hellaswag_stand_in.jsonl"), format="hellaswag"), "hs", str(tmp))
    rendered = render_all(task, tok, model.config.block_size)
    report = {"threads": torch.get_num_threads(), "cpu_has_fast_bf16": cpu_has_fast_bf16(), "torch": torch.__version__,
              "mean_context_tokens": float(np.mean([ex.starts[0] for ex in rendered])),
              "mean_row_tokens": float(np.mean([len(r) for ex in rendered for r in ex.rows]))}
    if args.rounds:
        report["side_by_side_fp32"] = compare(model, tok, rows, rendered, args, tmp)
    if args.bpb_tokens:
        report |= dtypes(model, tok, rendered, args, tmp)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
