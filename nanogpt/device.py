"""Device and precision: what the `system` group resolves to on the machine at hand."""

import contextlib
import ctypes
import platform
import resource
import sys

import torch

from nanogpt.config import SystemConfig
from nanogpt.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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
            raise UserError(f"system.device={system.device} but CUDA is not available here: use system=cpu or system=auto")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("system.device=mps but MPS is not available here: use system=auto")
    return torch.device(name)  # cpu or mps: system.device's range allows nothing else


def resolve_dtype(system: SystemConfig, device: torch.device) -> torch.dtype:
    if system.dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU and MPS stay fp32 (nanoGPT parity); bf16 on CPU is opt-in
    dtype = DTYPES[system.dtype]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("system.dtype=bfloat16 but this GPU has no bf16: use system.dtype=float16")
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("system.dtype=float16 is not supported on CPU: use bfloat16 or float32")
    return dtype


def configure_backends(system: SystemConfig, device: torch.device) -> None:
    """The process-wide switches a run's `system` group sets: TF32, determinism, host memory."""
    if system.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = system.tf32
        torch.backends.cudnn.allow_tf32 = system.tf32
    if device.type == "cpu":
        malloc_policy(keep_freed=system.cpu_memory_cache)


def malloc_policy(keep_freed: bool) -> None:
    """How glibc's malloc treats freed memory of a CPU run.

    keep_freed=True keeps it for reuse, as a caching allocator does on a GPU. By default glibc
    serves every block over 32 MiB with its own mmap and returns it on free, so each step of a
    large CPU model (the baby model's activations are ~5 GiB) maps fresh pages and the kernel
    faults and zeroes every one of them again: about a million page faults a step. With mmap off
    and trimming off, blocks come from the heap and freed ones are reused.

    keep_freed=False gives blocks of 1 MiB and more their own mmap, returned when freed. glibc's
    default threshold would rise towards 32 MiB as blocks are freed, and freed blocks under it
    stay in the heap: resident memory would count what FSDP's gathered weights held long after.
    With a fixed threshold it follows the memory in use, which is what a memory figure needs.
    Numerics are untouched either way. Nothing changes where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # <malloc.h>
    if keep_freed:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, -1)  # -1 becomes SIZE_MAX inside glibc: never trim the heap's top
    else:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_compile(system: SystemConfig, device: torch.device) -> bool:
    return device.type == "cuda" if system.compile is None else system.compile


def memory_mb(device: torch.device) -> dict[str, float]:
    """This process's memory on a device, in MiB, as the log lines, metrics.jsonl and bench.py give
    it. mem_peak_mb: on CUDA the most allocated since start; elsewhere the peak resident memory
    (ru_maxrss: the whole process, Python and data included). CUDA adds what is allocated now and
    what the caching allocator reserves (allocated plus cached blocks: what nvidia-smi shows, less
    the context)."""
    if device.type == "cuda":
        return {
            "mem_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "mem_allocated_mb": torch.cuda.memory_allocated(device) / 2**20,
            "mem_reserved_mb": torch.cuda.memory_reserved(device) / 2**20,
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"mem_peak_mb": (rss if sys.platform == "darwin" else rss * 1024) / 2**20}
