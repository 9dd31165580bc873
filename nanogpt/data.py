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
data.align=true, start at documents' first tokens, or, with data.packing=bestfit, are rows of
whole documents packed once per split (nanogpt.packing).

A batch is (x, y), or (x, y, positions) for a model that masks documents (model.doc_mask):
each input token's place in its document, 0 where one starts. y is -1 where a packed row is
padding. A mixture of folders (data=mix) is nanogpt.mixture's; `python -m nanogpt.data inspect`
shows what a loader feeds without training.
"""

import json
import logging
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from nanogpt.config import DataConfig
from nanogpt.errors import UserError
from nanogpt.datafolder import load_meta
from nanogpt.packing import Packing, best_fit
from nanogpt.prepare import data_dir, prepare
from nanogpt.shards import TokenStream
from nanogpt.tokenizer import fingerprint

TRAIN, EVAL, EPOCH, PACK = 0, 1, 2, 3
SPLITS = {"train": 0, "val": 1}

Batch = tuple[torch.Tensor, ...]  # (x, y) or (x, y, positions), each (B, T)
Windows = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # a batch's arrays before the device

log = logging.getLogger("nanogpt")


class Loader:
    """What every loader shares: this rank's micro-batches in order, the next one built in a
    thread while the step runs. A loader says what train_windows(iteration, micro_step) holds;
    the trainer also asks it for eval_sources(iteration) (each source's eval_batches and weight),
    phases(max_iters) and describe(max_iters); inspect_windows for source_names and
    train_sources(iteration, micro_step). BatchLoader: one folder; nanogpt.mixture's MixtureLoader."""

    device: torch.device
    micro_steps: int
    prefetch: bool
    documents: bool  # batches carry positions (a model with doc_mask)

    def train_windows(self, iteration: int, micro_step: int) -> Windows:
        raise NotImplementedError

    def batch(self, windows: Windows) -> Batch:
        x, y, positions = windows
        arrays = (x, y) if positions is None or not self.documents else (x, y, positions)
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in arrays)
        return tuple(t.pin_memory() for t in tensors) if self.device.type == "cuda" else tensors

    def _train_batch(self, iteration: int, micro_step: int) -> Batch:
        return self.batch(self.train_windows(iteration, micro_step))

    def _to_device(self, batch: Batch) -> Batch:
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def train_batches(self, start_iter: int, skipped: list[list[int]] = ()) -> Iterator[Batch]:
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


class BatchLoader(Loader):
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
        packing: str = "none",
        pack_buffer: int = 1000,
        documents: bool = False,
    ):
        self.path, self.meta = Path(path), load_meta(Path(path))
        self.batch_size, self.block_size, self.device, self.seed = batch_size, block_size, device, seed
        self.rank, self.world_size, self.micro_steps, self.prefetch = rank, world_size, micro_steps, prefetch
        self.order, self.packed, self.pack_buffer, self.documents = order, packing == "bestfit", pack_buffer, documents
        self.streams = split_streams(self.path, self.meta)
        for split, stream in self.streams.items():
            if stream.size <= block_size:
                raise UserError(
                    f"block_size {block_size} is larger than the {split} split of {self.path} ({stream.size} tokens): "
                    "lower model.block_size or add data"
                )
        self.starts = aligned_starts(self.streams["train"], block_size) if align else None
        self._packings: dict[str, Packing] = {}
        if self.packed:
            self.epoch_windows = self.packing("train").rows
        else:
            self.epoch_windows = len(self.starts) if align else self.streams["train"].size // block_size - 1
        if order == "epoch" and self.epoch_windows < 1:
            raise UserError(f"the train split of {self.path} holds no whole window of block_size {block_size}")
        self._epochs: dict[int, np.ndarray] = {}

    def packing(self, split: str) -> Packing:
        """The split's documents packed into rows (data.packing=bestfit), in an order drawn from the seed."""
        if split not in self._packings:
            docs, lengths = self.documents_of(split)
            keep = lengths > 0
            order = np.random.default_rng([self.seed, PACK, SPLITS[split]]).permutation(int(keep.sum()))
            packing = best_fit(docs[keep][order], lengths[keep][order], self.block_size + 1, self.pack_buffer)
            log.info(f"{self.path.name} {split}: {packing.summary()}")
            if packing.cut > packing.tokens / 2:  # documents far longer than a window: most of the split unread
                log.warning(f"{self.path.name} {split}: best-fit packing cuts most of the tokens (documents longer "
                            f"than block_size + 1); data.align=true reads them whole")
            self._packings[split] = packing
        return self._packings[split]

    def documents_of(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Each document's first token and length, in stream order (the split's start counts as one)."""
        return self._documents[split]

    @cached_property
    def _documents(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for split, stream in self.streams.items():
            docs = np.union1d([0], stream.document_starts()).astype(np.int64)
            out[split] = docs, np.diff(np.append(docs, stream.size))
        return out

    def draw(self, split: str, key: list[int]) -> np.ndarray:
        """batch_size windows of a split drawn with replacement by the generator `key`: starts,
        or packed rows."""
        rng = np.random.default_rng(key)
        if self.packed:
            return rng.integers(0, self.packing(split).rows, self.batch_size)
        if split == "train" and self.starts is not None:
            return self.starts[rng.integers(0, len(self.starts), self.batch_size)]
        return rng.integers(0, self.streams[split].size - self.block_size, self.batch_size)

    def windows(self, split: str, ids: np.ndarray) -> Windows:
        """(x, y, positions) of these windows of a split (starts, or packed rows)."""
        if self.packed:
            return self._rows(split, ids)
        tokens = self.streams[split].windows(ids, self.block_size + 1)  # (B, T+1)
        positions = self._positions(split, ids) if self.documents else None
        return tokens[:, :-1], tokens[:, 1:], positions

    def _positions(self, split: str, starts: np.ndarray) -> np.ndarray:
        """Each token's place in its document, from the window's start (B, T)."""
        docs = self.documents_of(split)[0]
        at = starts[:, None] + np.arange(self.block_size)
        begins = np.maximum(docs[np.searchsorted(docs, at, side="right") - 1], starts[:, None])
        return at - begins

    def _rows(self, split: str, rows: np.ndarray) -> Windows:
        capacity = self.block_size + 1
        starts, lengths, row = self.packing(split).segments(rows)
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # place in its document
        filled = np.bincount(row, weights=lengths, minlength=len(rows)).astype(np.int64)[:, None]
        real = np.arange(capacity) < filled  # (B, T+1): documents, then padding
        tokens = np.zeros((len(rows), capacity), dtype=np.int64)
        tokens[real] = self.streams[split].take(np.repeat(starts, lengths) + within)
        positions = np.arange(capacity) - filled  # the padding: a document of its own
        positions[real] = within
        return tokens[:, :-1], np.where(real, tokens, -1)[:, 1:], positions[:, :-1]

    def train_starts(self, iteration: int, micro_step: int) -> np.ndarray:
        """Where the windows of this rank's micro_step of an iteration start (packed: their rows):
        those of global micro-step g = r + W*m."""
        g = self.rank + self.world_size * micro_step
        if self.order == "random":
            return self.draw("train", [self.seed, TRAIN, iteration, g])
        # windows n*B ... n*B+B-1 of the one sequence, n counting the global micro-steps of all iterations
        n = (iteration * self.micro_steps * self.world_size + g) * self.batch_size + np.arange(self.batch_size)
        epochs, index = np.divmod(n, self.epoch_windows)
        return np.concatenate([self.epoch(int(e))[index[epochs == e]] for e in np.unique(epochs)])

    def epoch(self, e: int) -> np.ndarray:
        """Every window of epoch e (starts, or packed rows), in the order the epoch visits them."""
        if e not in self._epochs:
            rng = np.random.default_rng([self.seed, EPOCH, e])
            if self.packed:
                windows = np.arange(self.epoch_windows)
            elif self.starts is not None:
                windows = self.starts
            else:  # the split tiled from an offset in [0, T): the last window ends by the split's end
                windows = rng.integers(0, self.block_size) + self.block_size * np.arange(self.epoch_windows)
            self._epochs = {e: windows[rng.permutation(self.epoch_windows)]}  # one epoch at a time in memory
        return self._epochs[e]

    def train_windows(self, iteration: int, micro_step: int) -> Windows:
        return self.windows("train", self.train_starts(iteration, micro_step))

    def eval_batches(self, split: str, eval_iters: int) -> Iterator[Batch]:
        """The same eval_iters batches at every evaluation; rank r takes batches r, r+W, ..."""
        for k in range(self.rank, eval_iters, self.world_size):
            yield self._to_device(self.batch(self.windows(split, self.draw(split, [self.seed, EVAL, SPLITS[split], k]))))

    def eval_sources(self, iteration: int) -> list[tuple[str | None, float, "BatchLoader"]]:
        """(name, weight, loader) of each source an evaluation reports: one folder, unnamed."""
        return [(None, 1.0, self)]

    def train_sources(self, iteration: int, micro_step: int) -> np.ndarray:
        """The source of each window of this rank's micro-step (an index into source_names)."""
        return np.zeros(self.batch_size, dtype=np.int64)

    @property
    def source_names(self) -> list[str]:
        return [self.path.name]

    def phases(self, max_iters: int) -> list[dict]:
        """A mixture's stretches of iterations with their weights: none for one folder."""
        return []

    def describe(self, max_iters: int) -> str:
        tokens = self.streams["train"].size
        epochs = max_iters * self.batch_size * self.micro_steps * self.world_size * self.block_size / tokens
        return f"data {self.path}: {max_iters:,} iterations read {epochs:.3g} epochs of its {tokens:,} train tokens"


class TokenData:
    """The data group's entry point (its `_target_`): a folder of token memmaps, prepared from the
    group's sources on first use. Rank 0 calls prepare() while the other ranks wait; then every
    rank reads meta and draws its batches. Another kind of data is another class with these three
    (nanogpt.mixture.MixtureData)."""

    def __init__(self, config: DataConfig):
        self.config, self.path = config, data_dir(config)

    def prepare(self) -> None:
        prepare(self.config)

    @property
    def meta(self) -> dict:
        """The vocabulary (tokenizer, vocab_size, chars) and token counts of the prepared folder."""
        return load_meta(self.path)

    def loader(
        self, *, block_size: int, device: torch.device, seed: int, rank: int = 0, world_size: int = 1,
        micro_steps: int = 1, documents: bool = False, max_iters: int | None = None,
    ) -> BatchLoader:
        """documents: batches carry each token's place in its document (model.doc_mask)."""
        c = self.config
        return BatchLoader(self.path, c.batch_size, block_size, device, seed, rank, world_size, micro_steps, c.prefetch,
                           c.order, c.align, c.packing, c.pack_buffer, documents)


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


def inspect_windows(loader: Loader, iters: int, max_iters: int) -> dict:
    """What iterations 0..iters-1 feed, every micro-step of every rank: the fraction of the
    windows and of the (target) tokens from each source, and the mixture's phases."""
    names = loader.source_names
    windows, tokens = np.zeros(len(names)), np.zeros(len(names))
    for it in range(iters):
        for m in range(loader.micro_steps):
            sources = loader.train_sources(it, m)
            _, y, _ = loader.train_windows(it, m)
            windows += np.bincount(sources, minlength=len(names))
            tokens += np.bincount(sources, weights=(y >= 0).sum(1), minlength=len(names))
    shares = lambda counts: dict(zip(names, (counts / max(counts.sum(), 1)).tolist()))  # noqa: E731
    return {"fractions": {"windows": shares(windows), "tokens": shares(tokens)}, "phases": loader.phases(max_iters)}


def format_report(report: dict, loader: Loader, tokenizer, show: int) -> str:
    """inspect_windows' report as a table, the phases, and the first `show` windows decoded."""
    f = report["fractions"]
    lines = [f"{'source':<24} {'windows':>8} {'tokens':>8}"]
    lines += [f"{name:<24} {f['windows'][name]:>8.2%} {f['tokens'][name]:>8.2%}" for name in loader.source_names]
    lines += [f"iterations {p['start']}-{p['end'] - 1}: " + ", ".join(f"{n} {w:.3f}" for n, w in p["weights"].items())
              for p in report["phases"]]
    (x, y, _), sources = loader.train_windows(0, 0), loader.train_sources(0, 0)
    for j in range(min(show, len(x))):
        text = tokenizer.decode(x[j][y[j] >= 0].tolist())  # padding left out
        lines.append(f"--- window {j} of iteration 0 ({loader.source_names[sources[j]]}):\n{text}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """python -m nanogpt.data inspect <run settings, e.g. data=mix ...> [iters=N] [show=K] [format=json]"""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from nanogpt.config import CONF, build, to_train_config
    from nanogpt.tokenizer import tokenizer_from_meta

    ours = {"iters": "100", "show": "3", "format": "text"}
    ours |= dict(a.split("=", 1) for a in argv[2:] if a.split("=", 1)[0] in ours)
    if argv[1:2] != ["inspect"] or not (ours["iters"].isdigit() and ours["show"].isdigit()) or \
            ours["format"] not in ("text", "json"):
        raise UserError("usage: python -m nanogpt.data inspect <settings, e.g. data=mix> [iters=N] [show=K] [format=json]")
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[a for a in argv[2:] if a.split("=", 1)[0] not in ours])
    except (HydraException, OmegaConfBaseException) as e:  # a key or option that does not exist, a bad value
        raise UserError(str(e).strip().splitlines()[0]) from None
    config = to_train_config(cfg)
    data = build(config.data)
    data.prepare()
    # one process taking every rank's micro-steps: the whole of each iteration
    loader = data.loader(block_size=config.model.block_size, device=torch.device("cpu"), seed=config.system.seed,
                         micro_steps=config.gradient_accumulation_steps, max_iters=config.max_iters)
    report = inspect_windows(loader, int(ours["iters"]), config.max_iters)
    if ours["format"] == "json":
        print(json.dumps(report))
    else:
        print(f"iterations 0-{int(ours['iters']) - 1} of {config.max_iters}, each {config.gradient_accumulation_steps} "
              f"x {config.data.batch_size} windows of {config.model.block_size} tokens")
        print(format_report(report, loader, tokenizer_from_meta(data.meta), int(ours["show"])))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        main(sys.argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
