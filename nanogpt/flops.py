"""Peak throughput, the denominator of MFU: a GPU's published peak, or a matmul measured here."""

import time
from functools import lru_cache

import torch

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
