"""Loss spikes: a training loss far above its recent past, caught and handled as spike.policy says.

Each rank judges its own loss (the mean over its micro-batches) against the last `window` losses
of its own that were not spikes: a spike is a loss above mean + sigma x std (the population std),
OLMo-core's stability monitor (6 sigma over 128 steps by default). Nothing is judged until the
window is full; a spike never enters the window; a non-finite loss is nan_policy's and is never
judged. The ranks' verdicts are reduced together (one all_reduce), so every rank takes the same
decision when only one rank's loss spikes.

- warn: the losses stay on the device and are judged in a batch at the loop's sync points (log
  lines, evaluations, saves): no per-step device sync;
- skip, rollback: the loss is read at every step, before the update is applied (a device sync,
  and with several ranks one small all_reduce, per step: docs/reliability.md has the cost).
"""

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from nanogpt import distributed
from nanogpt.config import SpikeConfig


@dataclass
class Spike:
    iter: int  # the iteration the spiking step completed (metrics.jsonl's "iter")
    ranks: list[int]  # whose loss spiked
    loss: float  # the highest of their losses
    threshold: float  # that rank's mean + sigma x std

    def record(self, action: str) -> dict:
        """As metrics.jsonl, status.json and the checkpoint keep it; action: warn, skip, rollback."""
        return {"iter": self.iter, "kind": "spike", "action": action, "loss": self.loss, "threshold": self.threshold,
                "ranks": self.ranks}


def describe(record: dict) -> str:
    """A spike record as one log line."""
    it = record.get("spike_iter", record["iter"])
    where = f" on rank {', '.join(map(str, record['ranks']))}" if record["ranks"] != [0] else ""
    done = {"warn": "training goes on", "skip": "the update was not applied",
            "rollback": f"rolled back to iteration {record['iter']}, {record.get('windows_skipped')} batches skipped"}
    return (f"loss spike at iteration {it}{where}: {record['loss']:.4f} > {record['threshold']:.4f} (the window's "
            f"mean + sigma x std); {done.get(record['action'], record['action'])}")


class SpikeMonitor:
    """One rank's window of recent losses and the verdicts all ranks agree on."""

    def __init__(self, config: SpikeConfig, dist: distributed.DistInfo, device: torch.device = torch.device("cpu")):
        self.config, self.dist, self.device = config, dist, device  # device: where the all_reduce runs (NCCL: the GPU)
        self.window: deque[float] = deque(maxlen=config.window)
        self.pending: list[tuple[int, torch.Tensor]] = []  # warn: (iteration, loss) not yet read

    @property
    def judges_each_step(self) -> bool:
        """skip and rollback decide before the update: the loss is read at every step."""
        return self.config.policy in ("skip", "rollback")

    def judge(self, iter_num: int, loss: torch.Tensor) -> Spike | None:
        """skip, rollback: whether the step completing iter_num spiked on any rank (a device sync)."""
        return self._agree([iter_num], [self._local(loss.item())])[0]

    def observe(self, iter_num: int, loss: torch.Tensor) -> None:
        """warn: keep the loss, on the device, until the next flush."""
        if self.config.policy == "warn":
            self.pending.append((iter_num, loss.detach().clone()))  # a copy: the log line all-reduces the loss in place

    def flush(self) -> list[Spike]:
        """warn: judge the losses kept since the last flush, in order (one read of them all). Every
        rank calls it at the same iterations: the verdicts are reduced together."""
        if not self.pending:
            return []
        iters, losses = zip(*self.pending)
        self.pending = []
        values = torch.stack(losses).tolist()
        return [s for s in self._agree(list(iters), [self._local(v) for v in values]) if s is not None]

    def _local(self, loss: float) -> tuple[bool, float, float]:
        """This rank's verdict on one loss: (spiked, loss, threshold). A loss that is not a spike
        enters the window."""
        if not math.isfinite(loss):
            return False, loss, math.nan
        threshold = self.threshold()
        spiked = threshold is not None and loss > threshold
        if not spiked:
            self.window.append(loss)
        return spiked, loss, threshold if threshold is not None else math.nan

    def threshold(self) -> float | None:
        """mean + sigma x std of the window; None until it is full."""
        if len(self.window) < self.config.window:
            return None
        losses = np.fromiter(self.window, dtype=np.float64, count=len(self.window))
        return float(losses.mean() + self.config.sigma * losses.std())  # numpy's std: the population's

    def _agree(self, iters: list[int], verdicts: list[tuple[bool, float, float]]) -> list[Spike | None]:
        """Every rank's verdicts on these iterations, from one all_reduce of a (3, iterations,
        ranks) table in which each rank fills its own column: spiked, loss, threshold."""
        rank, world = self.dist.rank, self.dist.world_size
        table = torch.zeros(3, len(iters), world, dtype=torch.float64)
        table[:, :, rank] = torch.tensor(verdicts, dtype=torch.float64).T.nan_to_num(nan=0.0)
        if self.dist.enabled:
            table = distributed.all_reduce(table.to(self.device)).cpu()
        out = []
        for i, it in enumerate(iters):
            ranks = [r for r in range(world) if table[0, i, r] > 0]
            worst = max(ranks, key=lambda r: table[1, i, r], default=None)
            out.append(Spike(it, ranks, table[1, i, worst].item(), table[2, i, worst].item()) if ranks else None)
        return out

    def state(self) -> list[float]:
        """What a checkpoint keeps of this rank: its window (flushed first: nothing pending)."""
        assert not self.pending, "flush() before saving: the window would miss the pending losses"
        return list(self.window)

    def load(self, window: list[float]) -> None:
        self.window = deque(window, maxlen=self.config.window)
        self.pending = []
