"""Dropout whose masks can be drawn on every CPU thread.

PyTorch's CPU `bernoulli_` runs on one thread, at 10-14 ns an element (torch 2.13, the same time
with 1 and 2 threads on an AMD EPYC and on an Intel Xeon): the baby model draws some 230 M of
them a step. Here each mask comes from numpy's PCG64 streams instead, 2^20 elements a
stream, filled by a thread pool: the same Bernoulli(1 - p) keep mask in distribution, a
different draw. Each mask's seed is drawn from torch's generator, so `torch.manual_seed` fixes
the masks and a checkpoint's RNG state resumes them exactly; the streams, not the threads, fix
the result, so the mask does not depend on the thread count.
"""

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn

STREAM = 1 << 20  # elements per random stream: a few ms of work per task
CHUNK = 1 << 15  # uniforms drawn at a time, to stay in cache before the comparison


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="dropout")


@torch.compiler.disable  # compiled code calls it as an opaque function: dynamo would rewrite numpy into torch
def keep_mask(shape: torch.Size | tuple[int, ...], p: float, workers: int | None = None) -> torch.Tensor:
    """A bool CPU tensor of `shape`, each element True with probability 1 - p, independently."""
    n = int(np.prod(shape))
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # torch's RNG state fixes the mask
    keep = np.empty(n, dtype=np.bool_)

    def fill(stream: int) -> None:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(stream,))))
        uniform = np.empty(CHUNK, dtype=np.float32)
        for start in range(stream * STREAM, min((stream + 1) * STREAM, n), CHUNK):
            u = uniform[: min(CHUNK, n - start)]
            rng.random(out=u, dtype=np.float32)
            np.greater_equal(u, p, out=keep[start : start + len(u)])

    streams = range((n + STREAM - 1) // STREAM)
    workers = workers or torch.get_num_threads()
    if workers == 1 or len(streams) == 1:
        for s in streams:
            fill(s)
    else:
        list(_pool(workers).map(fill, streams))  # numpy releases the GIL while it fills
    return torch.from_numpy(keep).view(shape)


class Dropout(nn.Dropout):
    """nn.Dropout; with `parallel` set, a CPU tensor's mask comes from `keep_mask`."""

    parallel: bool = False

    def draws_own_mask(self, x: torch.Tensor) -> bool:
        return self.parallel and self.training and self.p > 0 and x.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.draws_own_mask(x):
            return x.mul(keep_mask(x.shape, self.p)).mul_(1.0 / (1.0 - self.p))
        return super().forward(x)


def set_parallel_dropout(model: nn.Module, parallel: bool) -> None:
    """Draw the model's dropout masks with `keep_mask` (parallel=True) or PyTorch's kernel."""
    for m in model.modules():
        if isinstance(m, Dropout):
            m.parallel = parallel
