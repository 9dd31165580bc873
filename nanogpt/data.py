"""Batches of windows from a prepared data folder's token shards, as nanoGPT's get_batch, and
in epochs.

Every training window is a pure function of (seed, iteration, global micro-step), and every eval
window of (seed, split, eval batch): a resumed run draws the same batches with no generator state
to save, prefetching cannot shift them, and rank r of W simply takes global micro-steps
r, r+W, r+2W, ... of the one sequence a single process would take. A loss spike's rollback skips
windows by shifting that map (window_of), and the checkpoint keeps the shift.

data.order=random draws each window anywhere (with replacement, as nanoGPT). data.order=epoch
numbers the windows of all iterations, micro-steps and ranks in one sequence and deals them from
a permutation of the split's windows redrawn each epoch: every window once an epoch, and no two
ranks ever share one. The windows tile the split from an offset drawn each epoch, or, with
data.align=true, start at documents' first tokens.
"""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from nanogpt.config import DataConfig
from nanogpt.errors import UserError
from nanogpt.datafolder import load_meta
from nanogpt.prepare import data_dir, prepare
from nanogpt.shards import TokenStream
from nanogpt.tokenizer import fingerprint

TRAIN, EVAL, EPOCH = 0, 1, 2
SPLITS = {"train": 0, "val": 1}


class BatchLoader:
    def __init__(
        self,
        path: Path,
        batch_size: int,
        block_size: int,
        device: torch.device,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        micro_steps: int = 1,
        prefetch: bool = True,
        order: str = "random",
        align: bool = False,
    ):
        self.path, self.meta = Path(path), load_meta(Path(path))
        self.batch_size, self.block_size, self.device, self.seed = batch_size, block_size, device, seed
        self.rank, self.world_size, self.micro_steps, self.prefetch = rank, world_size, micro_steps, prefetch
        self.order = order
        self.streams = split_streams(self.path, self.meta)
        for split, stream in self.streams.items():
            if stream.size <= block_size:
                raise UserError(
                    f"block_size {block_size} is larger than the {split} split of {self.path} ({stream.size} tokens): "
                    "lower model.block_size or add data"
                )
        self.starts = aligned_starts(self.streams["train"], block_size) if align else None
        self.epoch_windows = len(self.starts) if align else self.streams["train"].size // block_size - 1
        if order == "epoch" and self.epoch_windows < 1:
            raise UserError(f"the train split of {self.path} holds no whole window of block_size {block_size}")
        self._epochs: dict[int, np.ndarray] = {}

    def _windows(self, split: str, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        windows = torch.from_numpy(self.streams[split].windows(starts, self.block_size + 1))  # (B, T+1)
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _random_starts(self, split: str, key: list[int]) -> np.ndarray:
        rng = np.random.default_rng(key)
        if split == "train" and self.starts is not None:
            return self.starts[rng.integers(0, len(self.starts), self.batch_size)]
        return rng.integers(0, self.streams[split].size - self.block_size, self.batch_size)

    def train_starts(self, iteration: int, micro_step: int) -> np.ndarray:
        """Where the windows of this rank's micro_step of an iteration start: those of global
        micro-step g = r + W*m."""
        g = self.rank + self.world_size * micro_step
        if self.order == "random":
            return self._random_starts("train", [self.seed, TRAIN, iteration, g])
        # windows n*B ... n*B+B-1 of the one sequence, n counting the global micro-steps of all iterations
        n = (iteration * self.micro_steps * self.world_size + g) * self.batch_size + np.arange(self.batch_size)
        epochs, index = np.divmod(n, self.epoch_windows)
        return np.concatenate([self.epoch(int(e))[index[epochs == e]] for e in np.unique(epochs)])

    def epoch(self, e: int) -> np.ndarray:
        """The start of every window of epoch e, in the order the epoch visits them."""
        if e not in self._epochs:
            rng = np.random.default_rng([self.seed, EPOCH, e])
            if self.starts is not None:
                starts = self.starts
            else:  # the split tiled from an offset in [0, T): the last window ends by the split's end
                starts = rng.integers(0, self.block_size) + self.block_size * np.arange(self.epoch_windows)
            self._epochs = {e: starts[rng.permutation(self.epoch_windows)]}  # one epoch at a time in memory
        return self._epochs[e]

    def _train_batch(self, iteration: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows("train", self.train_starts(iteration, micro_step))

    def _to_device(self, xy: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = xy
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_batches(self, start_iter: int, skipped: list[list[int]] = ()
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches from iteration start_iter on, in order; skipped: the windows
        that rollbacks skipped (window_of)."""
        steps = ((window_of(it, skipped), m) for it in range(start_iter, 2**62) for m in range(self.micro_steps))
        if not self.prefetch:
            for step in steps:
                yield self._to_device(self._train_batch(*step))
            return
        # one batch ahead in a thread: numpy's gather releases the GIL while the step runs
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
            pending = pool.submit(self._train_batch, *next(steps))
            for step in steps:
                batch = pending.result()
                pending = pool.submit(self._train_batch, *step)
                yield self._to_device(batch)

    def eval_batches(self, split: str, eval_iters: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same eval_iters batches at every evaluation; rank r takes batches r, r+W, ..."""
        for k in range(self.rank, eval_iters, self.world_size):
            yield self._to_device(self._windows(split, self._random_starts(split, [self.seed, EVAL, SPLITS[split], k])))


class TokenData:
    """The data group's entry point (its `_target_`): a folder of token memmaps, prepared from the
    group's sources on first use. Rank 0 calls prepare() while the other ranks wait; then every
    rank reads meta and draws its batches. Another kind of data is another class with these three."""

    def __init__(self, config: DataConfig):
        self.config, self.path = config, data_dir(config)

    def prepare(self) -> None:
        prepare(self.config)

    @property
    def meta(self) -> dict:
        """The vocabulary (tokenizer, vocab_size, chars) and token counts of the prepared folder."""
        return load_meta(self.path)

    def loader(
        self, *, block_size: int, device: torch.device, seed: int, rank: int = 0, world_size: int = 1, micro_steps: int = 1
    ) -> BatchLoader:
        c = self.config
        return BatchLoader(self.path, c.batch_size, block_size, device, seed, rank, world_size, micro_steps, c.prefetch,
                           c.order, c.align)


def window_of(iteration: int, skipped: list[list[int]]) -> int:
    """The windows an iteration trains on: its own, or, after a loss spike's rollback, later ones.
    skipped holds (first iteration, count) pairs: from that iteration on, count windows later."""
    return iteration + sum(count for first, count in skipped if iteration >= first)


def split_streams(path: Path, meta: dict) -> dict[str, TokenStream]:
    """Each split of a prepared folder as one token stream over its shards."""
    fp = fingerprint(meta)
    return {s: TokenStream([Path(path) / f for f in meta["splits"][s]["shards"]], fp) for s in SPLITS}


def aligned_starts(stream: TokenStream, block_size: int) -> np.ndarray:
    """Windows that start at each document's first token, and every block_size tokens within a
    document longer than that; only those whose window ends inside the split."""
    docs = np.union1d([0], stream.document_starts())
    lengths = np.diff(np.append(docs, stream.size))
    per_doc = -(-lengths // block_size)
    first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    starts = np.repeat(docs, per_doc) + block_size * (np.arange(per_doc.sum()) - first)
    return starts[starts < stream.size - block_size]
