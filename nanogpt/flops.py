"""FLOPs, in one place: a model's size and training FLOPs per token (the numerator of MFU, the
unit of a compute budget), and a device's peak throughput (the denominator of MFU).

The count is structural, so it holds for any nn.Module: N = params_non_embedding(model) is every
weight matrix that multiplies activations (every Linear, the LM head included and counted once
when tied to the token embedding), never an embedding lookup, a bias or a norm's gain. Training
FLOPs per token = 6N (forward 2N, backward 4N) + 12 x n_layer x n_embd x block_size for attention's
two T x T matmuls (PaLM appendix B; nanoGPT's estimate_mfu, nanochat's estimate_flops). Softmax,
norms and other elementwise work are not counted. tests/test_flops.py checks the total against
torch's FlopCounterMode for every model preset.
"""

import math
import time
from functools import lru_cache

import torch
from torch import nn

from nanogpt.errors import UserError


def params(model: nn.Module) -> int:
    """Every parameter, a tied one counted once."""
    return sum(p.numel() for p in model.parameters())


def params_non_embedding(model: nn.Module) -> int:
    """N: the weight matrices that multiply activations: every parameter of 2 or more dimensions
    held by a module other than an embedding lookup (a tied LM head counts, once)."""
    matrices = {id(p): p for m in model.modules() if not isinstance(m, nn.Embedding)
                for p in m.parameters(recurse=False) if p.dim() >= 2}
    return sum(p.numel() for p in matrices.values())


def attention_flops_per_token(config) -> int:
    """Training FLOPs per token of attention's scores and weighted sum, from the model's config:
    per layer, forward 2 x 2 x n_embd x T, backward twice that."""
    return 12 * config.n_layer * config.n_embd * config.block_size


def flops_per_token(model: nn.Module) -> int:
    """Training (forward + backward) FLOPs per token at the model's full context: a model's own
    count when it has one (the model protocol's optional flops_per_token()), else 6N plus
    attention's, or 6N alone for a config without n_embd."""
    own = getattr(model, "flops_per_token", None)
    if own is not None:
        return own()
    attention = attention_flops_per_token(model.config) if hasattr(model.config, "n_embd") else 0
    return 6 * params_non_embedding(model) + attention

# published dense bf16 tensor-core peaks, FLOP/s, by device-name fragment (most specific first)
GPU_PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
]


def published_peak(device: torch.device) -> float | None:
    """The GPU's published dense bf16 peak, FLOP/s, when its name is known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for fragment, flops in GPU_PEAK_BF16 if fragment in name), None)


@lru_cache
def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from): published bf16 peak for known GPUs, else measured
    with a large matmul in the run's dtype."""
    published = published_peak(device)
    if published:
        return published, f"published bf16 peak of {torch.cuda.get_device_name(device)}"
    return measure_matmul_flops(device, dtype), f"measured {str(dtype).removeprefix('torch.')} matmul"


@lru_cache
def cpu_has_fast_bf16() -> bool:
    """Whether a bf16 matmul runs at least twice as fast as an fp32 one on this CPU, measured once
    a process (about 0.15 s). The CPU flags do not tell: an AMD EPYC (Zen 5) with AVX512-BF16
    multiplied bf16 at 4.2-4.6x its fp32 rate (about 800 against 185 GFLOP/s), while an Intel Xeon
    with the same flag and no AMX ran it at 0.55x (torch 2.13, 2 threads). Twice is far from both."""
    cpu = torch.device("cpu")
    best = {torch.float32: 0.0, torch.bfloat16: 0.0}
    for _ in range(2):  # interleaved, best of two: a busy moment slows one sample, not the verdict
        for dtype in best:
            best[dtype] = max(best[dtype], measure_matmul_flops(cpu, dtype, n=512, seconds=0.03))
    return best[torch.bfloat16] >= 2 * best[torch.float32]


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul of size up to n. The size doubles from 256 only while the next
    product would fit in `seconds`: a slow path (bf16 on a CPU without bf16 units runs below
    1 GFLOP/s) is measured in a second, not in minutes."""
    gen = torch.Generator(device).manual_seed(0)  # never the global RNG: a resumed run's dropout depends on it
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    size = min(256, n)
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
        b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
        a @ b  # warm-up
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        if size >= n or 8 * (time.perf_counter() - t) > seconds:  # twice the size: 8x the work
            break
        size = min(2 * size, n)
    n = size
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def budget_iters(*, params_non_embedding: int, flops_per_token: int, tokens_per_iter: int,
                 tokens_per_param: float | None = None, flops_budget: float | None = None) -> int:
    """max_iters of a compute budget: its tokens (tokens_per_param x N, or flops_budget / FLOPs
    per token) over an iteration's tokens, rounded to the nearest. A budget short of one
    iteration is refused, naming the smallest budget that works."""
    if tokens_per_param is not None:
        key, value = "tokens_per_param", tokens_per_param
        iters, one_iter = tokens_per_param * params_non_embedding / tokens_per_iter, tokens_per_iter / params_non_embedding
    else:
        key, value = "flops_budget", flops_budget
        iters, one_iter = flops_budget / (flops_per_token * tokens_per_iter), flops_per_token * tokens_per_iter
    if iters < 1:
        raise UserError(
            f"{key}={value:g} is less than one iteration ({tokens_per_iter:,} tokens, "
            f"{flops_per_token * tokens_per_iter:.3g} FLOPs) of this model ({params_non_embedding:,} parameters N): "
            f"the smallest budget that works is {key}={_round_up(one_iter):g}"
        )
    return math.floor(iters + 0.5)


def _round_up(x: float, digits: int = 3) -> float:
    """x rounded up to `digits` significant digits: a budget printed this way is never short."""
    step = 10 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(x / step) * step
