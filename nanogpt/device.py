"""Device, precision and peak throughput: what `system` resolves to on the machine at hand."""

import contextlib
import ctypes
import platform
import time
from functools import lru_cache

import torch

from nanogpt.config import ConfigError, SystemConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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


def resolve_device(system: SystemConfig, local_rank: int = 0) -> torch.device:
    name = system.device
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"system.device={system.device} but CUDA is not available here: use system=cpu or system=auto")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("system.device=mps but MPS is not available here: use system=auto")
    if name not in ("cpu", "mps"):
        raise ConfigError(f"system.device={system.device!r}: choose auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def resolve_dtype(system: SystemConfig, device: torch.device) -> torch.dtype:
    if system.dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU and MPS stay fp32 (nanoGPT parity); bf16 on CPU is opt-in
    dtype = DTYPES[system.dtype]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("system.dtype=bfloat16 but this GPU has no bf16: use system.dtype=float16")
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("system.dtype=float16 is not supported on CPU: use bfloat16 or float32")
    return dtype


def configure_backends(system: SystemConfig, device: torch.device) -> None:
    """The process-wide switches a run's `system` group sets: TF32, determinism, host memory."""
    if system.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = system.tf32
        torch.backends.cudnn.allow_tf32 = system.tf32
    if device.type == "cpu" and system.cpu_memory_cache:
        keep_freed_memory()


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for reuse, as a caching allocator does on a GPU.

    By default glibc serves every block over 32 MiB with its own mmap and returns it on free, so
    each step of a large CPU model (the baby model's activations are ~5 GiB) maps fresh pages and
    the kernel faults and zeroes every one of them again: about a million page faults a step.
    With mmap off and trimming off, blocks come from the heap and freed ones are reused. Numerics
    are untouched. Nothing changes where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, -1)  # -1 becomes SIZE_MAX inside glibc: never trim the heap's top


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_compile(system: SystemConfig, device: torch.device) -> bool:
    return device.type == "cuda" if system.compile is None else system.compile


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


@lru_cache
def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from): published bf16 peak for known GPUs, else measured
    with a large matmul in the run's dtype."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, flops in GPU_PEAK_BF16:
            if fragment in name:
                return flops, f"published bf16 peak of {name}"
    return measure_matmul_flops(device, dtype), f"measured {str(dtype).replace('torch.', '')} matmul"


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
