"""Document masking's attention, side by side: flex_attention with a BlockMask (what model.doc_mask
runs on CUDA under torch.compile) against scaled_dot_product_attention with the dense block-diagonal
mask (what it runs elsewhere), and plain causal SDPA (no document mask) for scale. Forward and
backward of one attention call, compiled, in alternating rounds; medians.

    python scripts/bench_doc_mask.py                     # CUDA, bf16, T=1024 and 2048
    python scripts/bench_doc_mask.py --device cpu --dtype float32 --T 256 --rounds 3   # a dry run, forward only
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from nanogpt.model import document_mask


def positions_of(B: int, T: int, mean_len: int, device) -> torch.Tensor:
    """Each row's documents, of lengths drawn around mean_len (the last one cut at T)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(B):
        parts, n = [], 0
        while n < T:
            length = int(torch.empty(1).exponential_(1 / mean_len, generator=g).item()) + 1
            parts.append(torch.arange(min(length, T - n)))
            n += parts[-1].numel()
        rows.append(torch.cat(parts))
    return torch.stack(rows).to(device)


def timed(fn, q, k, v, sync) -> float:
    """Forward and backward (forward only where q needs no gradient: flex_attention's backward is CUDA's)."""
    for t in (q, k, v):
        t.grad = None
    sync()
    t0 = time.perf_counter()
    out = fn(q, k, v)
    if q.requires_grad:
        out.sum().backward()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--T", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--mean-doc", type=int, default=400, help="mean document length, tokens")
    p.add_argument("--rounds", type=int, default=20)
    a = p.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = []
    for T in a.T:
        positions = positions_of(a.B, T, a.mean_doc, device)
        dense, block = document_mask(positions), document_mask(positions, flex=True)
        grad = device.type == "cuda"
        q, k, v = (torch.randn(a.B, a.heads, T, 64, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))
        ways = {
            "flex_attention, BlockMask": torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=block)),
            "SDPA, dense mask": torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)),
            "SDPA, causal (no document mask)": torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        }
        times = {name: [] for name in ways}
        for name, fn in ways.items():  # compile and warm up
            timed(fn, q, k, v, sync)
        for _ in range(a.rounds):
            for name, fn in ways.items():
                times[name].append(timed(fn, q, k, v, sync))
        for name, ts in times.items():
            results.append({"T": T, "way": name, "ms": 1000 * statistics.median(ts)})
            print(f"T={T:5d}  {name:34s} {results[-1]['ms']:8.2f} ms ({'forward + backward' if grad else 'forward'}, "
                  f"median of {a.rounds})")
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": a.dtype,
                      "B": a.B, "heads": a.heads, "mean_doc": a.mean_doc, "results": results}))


if __name__ == "__main__":
    main()
