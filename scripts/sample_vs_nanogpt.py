"""Sampling speed side by side with nanoGPT's sample.py, on one random GPT-2 124M checkpoint.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    python scripts/sample_vs_nanogpt.py /tmp/nanoGPT --samples 1 8 --json /tmp/sample_bench.json

The checkpoint is written by nanoGPT's own model.py (random weights, GPT-2 124M shape): ours loads
nanoGPT's format, nanoGPT cannot load ours. Both run on the CPU in fp32 (nanoGPT with
--device=cpu --compile=False) from the same 16-token prompt, temperature 0.8 and top-k 200.
Each command is timed twice, for max_new_tokens=N and =1; their difference is the time of N-1
new tokens a sample, without start-up, loading and the prompt: tokens/s = samples x (N-1) / that.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT_SOURCE = "ROMEO: Is the day so young? Then let us walk together to the old chapel by the river, and speak of it."

WRITE_CHECKPOINT = """
import sys, torch
from model import GPT, GPTConfig
torch.manual_seed(0)
args = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True, vocab_size=50257, dropout=0.0)
model = GPT(GPTConfig(**args))
torch.save({"model": model.state_dict(), "model_args": args, "iter_num": 0, "best_val_loss": 1e9, "config": {}}, sys.argv[1])
"""


def timed(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def commands(nanogpt: Path, work: Path, samples: int, new_tokens: int) -> dict[str, tuple[list[str], Path]]:
    prompt = f"FILE:{work / 'prompt.txt'}"
    return {
        "nanoGPT": ([sys.executable, "sample.py", "--init_from=resume", f"--out_dir={work}", "--device=cpu",
                     "--compile=False", "--dtype=float32", f"--num_samples={samples}",
                     f"--max_new_tokens={new_tokens}", f"--start={prompt}"], nanogpt),
        "ours": ([sys.executable, str(ROOT / "sample.py"), f"init_from={work / 'ckpt.pt'}", "device=cpu", "dtype=float32",
                  f"num_samples={samples}", f"max_new_tokens={new_tokens}", f"start={prompt}", "stream=false"], ROOT),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("nanogpt", type=Path, help="a clone of karpathy/nanoGPT")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sample_vs_nanogpt"))
    parser.add_argument("--skip-nanogpt-batch", action="store_true",
                        help="time nanoGPT for 1 sample only: its sample.py draws samples one after another")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import tiktoken

    args.work.mkdir(parents=True, exist_ok=True)
    enc = tiktoken.get_encoding("gpt2")
    (args.work / "prompt.txt").write_text(enc.decode(enc.encode(PROMPT_SOURCE)[:16]))
    if not (args.work / "ckpt.pt").exists():
        subprocess.run([sys.executable, "-c", WRITE_CHECKPOINT, str(args.work / "ckpt.pt")], cwd=args.nanogpt, check=True)

    results = []
    for samples in args.samples:
        for name in ("nanoGPT", "ours"):
            if name == "nanoGPT" and samples > 1 and args.skip_nanogpt_batch:
                continue
            long_cmd, cwd = commands(args.nanogpt, args.work, samples, args.new_tokens)[name]
            short_cmd, _ = commands(args.nanogpt, args.work, samples, 1)[name]
            seconds = timed(long_cmd, cwd) - timed(short_cmd, cwd)
            tokens_per_s = samples * (args.new_tokens - 1) / seconds
            results.append({"impl": name, "samples": samples, "new_tokens": args.new_tokens,
                            "seconds": seconds, "tokens_per_s": tokens_per_s})
            print(f"{name:8s} {samples} sample(s): {seconds:7.1f} s for {args.new_tokens - 1} new tokens each, "
                  f"{tokens_per_s:8.1f} tokens/s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
