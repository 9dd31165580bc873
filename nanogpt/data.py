"""Batches of random windows from a prepared data folder's token memmaps, as nanoGPT's get_batch.

Every training window is a pure function of (seed, iteration, global micro-step), and every eval
window of (seed, split, eval batch): a resumed run draws the same batches with no generator state
to save, prefetching cannot shift them, and rank r of W simply takes global micro-steps
r, r+W, r+2W, ... of the one sequence a single process would take.
"""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from nanogpt.config import DataConfig
from nanogpt.errors import UserError
from nanogpt.prepare import data_dir, load_meta, prepare

TRAIN, EVAL = 0, 1
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
    ):
        self.path, self.meta = Path(path), load_meta(Path(path))
        self.batch_size, self.block_size, self.device, self.seed = batch_size, block_size, device, seed
        self.rank, self.world_size, self.micro_steps, self.prefetch = rank, world_size, micro_steps, prefetch
        self.offsets = np.arange(block_size + 1)
        for split in SPLITS:
            n = self._memmap(split).size
            if n <= block_size:
                raise UserError(
                    f"block_size {block_size} is larger than the {split} split of {self.path} ({n} tokens): "
                    "lower model.block_size or add data"
                )

    def _memmap(self, split: str) -> np.memmap:
        # re-opened per batch, as nanoGPT does: a long-lived memmap's pages count as leaked memory
        file = self.path / f"{split}.bin"
        if not file.exists() or file.stat().st_size == 0:
            raise UserError(f"{file} is missing or empty: prepare the data again (delete {self.path})")
        return np.memmap(file, dtype=self.meta["dtype"], mode="r")

    def _host_batch(self, split: str, key: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        data = self._memmap(split)
        starts = np.random.default_rng(key).integers(0, data.size - self.block_size, self.batch_size)
        windows = torch.from_numpy(data[starts[:, None] + self.offsets].astype(np.int64))  # (B, T+1), one gather
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _to_device(self, xy: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = xy
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_key(self, iteration: int, micro_step: int) -> list[int]:
        """The window seed of this rank's micro_step of an iteration: global micro-step r + W*m."""
        return [self.seed, TRAIN, iteration, self.rank + self.world_size * micro_step]

    def train_batches(self, start_iter: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches from iteration start_iter on, in order."""
        keys = (self.train_key(it, m) for it in range(start_iter, 2**62) for m in range(self.micro_steps))
        if not self.prefetch:
            for key in keys:
                yield self._to_device(self._host_batch("train", key))
            return
        # one batch ahead in a thread: numpy's gather releases the GIL while the step runs
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
            pending = pool.submit(self._host_batch, "train", next(keys))
            for key in keys:
                batch = pending.result()
                pending = pool.submit(self._host_batch, "train", key)
                yield self._to_device(batch)

    def eval_batches(self, split: str, eval_iters: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same eval_iters batches at every evaluation; rank r takes batches r, r+W, ..."""
        for k in range(self.rank, eval_iters, self.world_size):
            yield self._to_device(self._host_batch(split, [self.seed, EVAL, SPLITS[split], k]))


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
        return BatchLoader(self.path, c.batch_size, block_size, device, seed, rank, world_size, micro_steps, c.prefetch)
