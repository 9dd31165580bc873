"""Data mixtures (data=mix): each training window drawn from one of several prepared folders in
proportion to its weight, the weights changing in phases.

    python train.py data=mix data.mix='{shakespeare:0.7,code:0.3}'
    python train.py data=mix data.mix='{web:0.5,books:0.5}' data.mix_phases='[{until:0.8,weights:{web:1}}]'

A source is a data preset (conf/data/<name>.yaml, prepared on first use as data=<name> would
be, under the mixture's data.root) or a folder prepared earlier under data.root. The sources
share one vocabulary. A phase's weights apply up to iteration floor(until x max_iters), those
of data.mix after the last phase.

Window j of global micro-step g of an iteration comes from the source a uniform draw keyed
(seed, iteration, g) picks against the phase's cumulative weights. Which of the source's windows:
with data.order=random, a draw keyed (seed, iteration, g, the source's name), as the folder alone
draws; with data.order=epoch, the source's next ones in its epochs' order (the folder's own),
counted over every earlier micro-step of every rank. Everything is a pure function of (seed,
iteration, g, j): a resumed run and any number of ranks see what one process sees, and changing a
weight changes which source a window comes from, not what a source's windows hold (at random). Each evaluation scores every source on the windows a
run on it alone would score (val_loss/<name>) and the mixture as their mean weighted by the
weights it is training with.
"""

import logging
import math
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from nanogpt.checks import check
from nanogpt.config import DataConfig, MixConfig, data_preset
from nanogpt.data import TRAIN, BatchLoader, Loader, Windows
from nanogpt.errors import UserError
from nanogpt.datafolder import damaged, load_meta
from nanogpt.prepare import data_dir, prepare
from nanogpt.tokenizer import definition

MIX = 4  # a stream of generator keys of its own (nanogpt.data has TRAIN, EVAL, EPOCH, PACK)

log = logging.getLogger("nanogpt")


def source_config(name: str, root: str) -> DataConfig | None:
    """A data preset's settings, its folder under root; None: not a preset (a prepared folder)."""
    preset = data_preset(name)
    if preset is None:
        return None
    node = OmegaConf.load(preset)
    node.pop("defaults", None)  # the schema it names is DataConfig's
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), node, {"root": root}))
    check(config, f"data.mix.{name}: ")
    return config


class Phases:
    """The weights of each stretch of iterations: the phases', then data.mix's up to max_iters
    (None: data.mix's throughout)."""

    def __init__(self, config: MixConfig, max_iters: int | None):
        self.names = list(config.mix)
        self.stretches: list[tuple[int, int, np.ndarray]] = []  # (first iteration, end, normalised weights)
        start = 0
        for phase in config.mix_phases if max_iters is not None else []:
            end = math.floor(Fraction(repr(phase.until)) * max_iters)  # 0.29 x 100 is 29, not 28.999...
            if end > start:
                self.stretches.append((start, end, self._vector(phase.weights)))
            start = max(start, end)
        self.stretches.append((start, max_iters if max_iters is not None else 2**62, self._vector(config.mix)))

    def _vector(self, weights: dict[str, float]) -> np.ndarray:
        w = np.array([weights.get(name, 0.0) for name in self.names], dtype=np.float64)
        return w / w.sum()

    def weights(self, iteration: int) -> np.ndarray:
        return next((w for start, end, w in self.stretches if iteration < end), self.stretches[-1][2])

    def cumulative(self, iteration: int) -> np.ndarray:
        c = np.cumsum(self.weights(iteration))
        c[-1] = 1.0  # no draw in [0, 1) falls past the last source
        return c

    def as_records(self) -> list[dict]:
        return [{"start": start, "end": end, "weights": dict(zip(self.names, w.round(6).tolist()))}
                for start, end, w in self.stretches]


class MixtureLoader(Loader):
    def __init__(self, parts: dict[str, BatchLoader], phases: Phases, seed: int, rank: int, world_size: int,
                 micro_steps: int, prefetch: bool, documents: bool, order: str = "random"):
        first = next(iter(parts.values()))
        self.parts, self.phase_table, self.seed, self.rank, self.world_size = parts, phases, seed, rank, world_size
        self.micro_steps, self.prefetch, self.documents, self.order = micro_steps, prefetch, documents, order
        self._counted = (0, np.zeros(len(parts), dtype=np.int64))  # (global micro-steps counted, windows per source)
        self.device, self.batch_size, self.block_size = first.device, first.batch_size, first.block_size
        self.streams = first.streams  # what bits per byte reads: the first source's splits
        self.tags = {name: zlib.crc32(name.encode()) for name in parts}

    @property
    def source_names(self) -> list[str]:
        return list(self.parts)

    def train_sources(self, iteration: int, micro_step: int) -> np.ndarray:
        """The source of each window of this rank's micro-step (an index into source_names)."""
        return self._sources(iteration, self.rank + self.world_size * micro_step)

    def _sources(self, iteration: int, g: int) -> np.ndarray:
        u = np.random.default_rng([self.seed, MIX, iteration, g]).random(self.batch_size)
        return np.searchsorted(self.phase_table.cumulative(iteration), u, side="right")

    def _windows_before(self, n: int) -> np.ndarray:
        """How many windows each source gave global micro-steps 0..n-1 (all iterations, all ranks):
        counted once, then kept up to date as the micro-steps come in order."""
        done, counts = self._counted if self._counted[0] <= n else (0, np.zeros(len(self.parts), dtype=np.int64))
        for step in range(done, n):
            counts = counts + np.bincount(self._sources(*divmod(step, self.micro_steps * self.world_size)),
                                          minlength=len(self.parts))
        self._counted = (n, counts)
        return counts

    def train_starts(self, iteration: int, micro_step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, window) of each window of this rank's micro-step: the source's next windows in
        its epochs' order (data.order=epoch), or its own draw for the micro-step (random)."""
        g = self.rank + self.world_size * micro_step
        sources, ids = self.train_sources(iteration, micro_step), np.zeros(self.batch_size, dtype=np.int64)
        for k, (name, part) in enumerate(self.parts.items()):
            rows = np.flatnonzero(sources == k)
            if not rows.size:
                continue
            if self.order == "random":
                ids[rows] = part.draw("train", [self.seed, TRAIN, iteration, g, self.tags[name]])[rows]
                continue
            n = self._windows_before(iteration * self.micro_steps * self.world_size + g)[k] + np.arange(rows.size)
            epochs, index = np.divmod(n, part.epoch_windows)
            ids[rows] = np.concatenate([part.epoch(int(e))[index[epochs == e]] for e in np.unique(epochs)])
        return sources, ids

    def train_windows(self, iteration: int, micro_step: int) -> Windows:
        sources, ids = self.train_starts(iteration, micro_step)
        shape = (self.batch_size, self.block_size)
        x, y = np.empty(shape, dtype=np.int64), np.empty(shape, dtype=np.int64)
        positions = np.empty(shape, dtype=np.int64) if self.documents else None
        for k, part in enumerate(self.parts.values()):
            rows = np.flatnonzero(sources == k)
            if rows.size:
                x[rows], y[rows], p = part.windows("train", ids[rows])
                if positions is not None:
                    positions[rows] = p
        return x, y, positions

    def eval_sources(self, iteration: int) -> list[tuple[str, float, BatchLoader]]:
        """(name, weight, loader) of each source, weighted as the step before `iteration` trained."""
        weights = self.phase_table.weights(max(iteration - 1, 0))
        return [(name, float(w), part) for (name, part), w in zip(self.parts.items(), weights)]

    def phases(self, max_iters: int) -> list[dict]:
        return self.phase_table.as_records()

    def describe(self, max_iters: int) -> str:
        """What max_iters iterations are expected to read of each source: its share of the
        windows, and the epochs of its train split that makes."""
        windows = self.batch_size * self.micro_steps * self.world_size  # an iteration's, over all ranks
        expected = np.zeros(len(self.parts))  # windows from each source
        for start, end, w in self.phase_table.stretches:
            expected += max(min(end, max_iters) - start, 0) * windows * w
        total = expected.sum()
        lines = [f"data mix of {len(self.parts)} source{'s' * (len(self.parts) > 1)}: {total:,.0f} windows of "
                 f"{self.block_size} over {max_iters:,} iterations"]
        for (name, part), n in zip(self.parts.items(), expected):
            tokens = part.streams["train"].size
            lines.append(f"  {name}: {n / max(total, 1):.1%} of the windows, {n * self.block_size / tokens:.3g} epochs "
                         f"of its {tokens:,} train tokens ({part.path})")
        for i, (start, end, w) in enumerate(self.phase_table.stretches):
            if start >= max_iters:
                break
            lines.append(f"  phase {i + 1}, iterations {start}-{min(end, max_iters) - 1}: "
                         + ", ".join(f"{name} {x:.3f}" for name, x in zip(self.parts, w)))
        return "\n".join(lines)


class MixtureData:
    """The data group's entry point for data=mix: the nanogpt.data.TokenData interface (prepare,
    meta, loader) over several folders."""

    def __init__(self, config: MixConfig):
        self.config = config
        self.presets = {name: source_config(name, config.root) for name in config.mix}
        self.paths = {name: data_dir(c) if c is not None else Path(config.root).expanduser() / name
                      for name, c in self.presets.items()}
        self.path = next(iter(self.paths.values()))  # what bits per byte reads (nanogpt.eval)

    def prepare(self) -> None:
        self._same_tokenizer_kind()
        for name, c in self.presets.items():
            if c is not None:
                prepare(c)
            elif why := damaged(self.paths[name]):  # a folder prepared earlier, read as it is
                raise UserError(f"data.mix.{name}: {self.paths[name]} {why}: prepare it again")
        self.metas()  # every source there, with one vocabulary: checked before the other ranks read them

    def _same_tokenizer_kind(self) -> None:
        """Two kinds of tokenizer (char, gpt2, bpe...) among the presets' settings and the folders
        already there: one line before anything is prepared (the vocabularies themselves are
        compared once every folder is there)."""
        kinds = {name: c.tokenizer if c is not None else load_meta(self.paths[name])["tokenizer"]
                 for name, c in self.presets.items() if c is not None or (self.paths[name] / "meta.json").is_file()}
        (first, kind), *rest = kinds.items() if kinds else [(None, None)]
        if other := next(((name, k) for name, k in rest if k != kind), None):
            raise UserError(f"data.mix: {first} and {other[0]} have different tokenizers ({kind}, {other[1]}): "
                            "a mixture's sources share one")

    def metas(self) -> dict[str, dict]:
        """Each source's meta.json; their vocabularies must be one."""
        metas = {name: load_meta(path) for name, path in self.paths.items()}
        (first, m0), *rest = metas.items()
        for name, m in rest:
            if definition(m) != definition(m0):
                raise UserError(f"data.mix: {first} ({self.paths[first]}) and {name} ({self.paths[name]}) have different "
                                f"vocabularies ({m0['tokenizer']}, {m['tokenizer']}): a mixture's sources share one tokenizer")
        return metas

    @property
    def meta(self) -> dict:
        """The sources' one vocabulary, and each source's folder and token counts."""
        metas = self.metas()
        m0 = next(iter(metas.values()))
        sources = {name: {"folder": str(self.paths[name]), "train_tokens": m["train_tokens"], "val_tokens": m["val_tokens"]}
                   for name, m in metas.items()}
        return definition(m0) | {"vocab_size": m0["vocab_size"], "dtype": m0["dtype"], "mix": sources,
                                 "train_tokens": sum(m["train_tokens"] for m in metas.values()),
                                 "val_tokens": sum(m["val_tokens"] for m in metas.values())}

    def loader(
        self, *, block_size: int, device: torch.device, seed: int, rank: int = 0, world_size: int = 1,
        micro_steps: int = 1, documents: bool = False, max_iters: int | None = None,
    ) -> MixtureLoader:
        """max_iters places the phases (None: data.mix's weights throughout)."""
        c = self.config
        parts = {name: BatchLoader(path, c.batch_size, block_size, device, seed, rank, world_size, micro_steps,
                                   prefetch=False, order=c.order, align=c.align, packing=c.packing,
                                   pack_buffer=c.pack_buffer, documents=documents)
                 for name, path in self.paths.items()}
        return MixtureLoader(parts, Phases(c, max_iters), seed, rank, world_size, micro_steps, c.prefetch, documents,
                             c.order)
