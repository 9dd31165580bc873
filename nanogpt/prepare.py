"""Text -> token shards: <root>/<name>/{train_000000.bin, ..., val_000000.bin, ..., meta.json}.

A preparation reads the sources as a stream of pieces (nanogpt.sources), learns the vocabulary if
the tokenizer is trained (characters, or a BPE), encodes batches of pieces on every core and cuts
each split's tokens into shards of data.shard_tokens (nanogpt.shards). Memory stays bounded: a few
batches in flight and one open shard a split.

Resumable: after each batch that completes a shard, progress.json records the source position and
the open shards' tokens (in .partial files). A preparation killed at any point continues from
there and writes byte-identical shards, whatever data.workers: batches are a fixed number of
pieces counted from the start, and every piece is encoded on its own. data.max_tokens stops at the
end of the batch that reaches it; raising it later extends the folder from where it stopped.

A row file's bad row (data.bad_rows=stop) stops the preparation with what it has saved kept:
after the row is corrected, the same command continues where it can prove the bytes it already
read are unchanged, else restarts saying why (nanogpt.datafolder.cannot_continue); either way the
shards are byte-identical to a clean preparation's. meta.json, written last, marks a finished
folder and records what it was made from (nanogpt.datafolder).

    python -m nanogpt.prepare data=shakespeare
"""

import fcntl
import logging
import os
import shutil
import socket
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import numpy as np

from nanogpt.config import DataConfig
from nanogpt.datafolder import (LAYOUT, PROGRESS, REPREPARE, cannot_continue, damaged, load_meta, made_from, read_json,
                                stale, write_json)
from nanogpt.errors import UserError
from nanogpt.shards import read_shard, token_dtype, write_shard
from nanogpt.sources import Source, text_chars
from nanogpt.tokenizer import definition, fingerprint, tiktoken_encoding, tokenizer_from_meta, train_bpe

BATCH_PIECES = 128  # pieces encoded together: documents, or 64K-character chunks of text files
SPLITS = ("train", "val")

log = logging.getLogger("nanogpt")


def data_dir(data: DataConfig) -> Path:
    return Path(data.root).expanduser() / data.name


def prepare(data: DataConfig) -> Path:
    """Prepare the data folder if it is not there yet, finish or extend it, or prepare it again if
    data.reprepare=true and it was made from other settings or is damaged; return its path."""
    out = data_dir(data)
    with preparation_lock(out):
        meta = None
        if (out / "meta.json").exists():
            why, advice = damaged(out), REPREPARE
            if why is None:
                meta = load_meta(out)
                why, advice = stale(meta, data), f"choose another data.name, or {REPREPARE}"
                if why is None:
                    _remove_progress(out)  # a preparation killed after writing meta.json leaves some
                    return out
            if why != "extend":
                if not data.reprepare:
                    raise UserError(f"data folder {out} {why}: {advice}")
                log.warning(f"preparing {out} again: it {why}")
                _remove(out)
                meta = None
        elif not (out / "progress.json").exists() and any(not f.name.endswith(".tmp") for f in _files(out)):
            raise UserError(f"data folder {out} exists but holds no prepared data: remove it or point data.root elsewhere")
        try:
            Preparation(data, out, meta).run()
        except UserError:
            # a preparation stopped by its data keeps what it saved: once the file is corrected,
            # the same command continues (Preparation._resume_state says whether it can)
            if meta is None and out.exists() and not (read_json(out / "progress.json") or {}).get("position"):
                _remove(out)
            raise
    return out


def _remove_progress(out: Path) -> None:
    for f in [out / "progress.json", *out.glob("*.partial-*")]:
        f.unlink(missing_ok=True)


def _files(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


@contextmanager
def preparation_lock(out: Path):
    """One preparation of a folder at a time (the jobs of a sweep start together); the others wait,
    then find it prepared."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove(out: Path) -> None:
    """Move the folder aside in one rename, then delete it: it never exists half-deleted."""
    old = out.with_name(f".{out.name}.old-{socket.gethostname()}-{os.getpid()}")
    out.rename(old)
    shutil.rmtree(old, ignore_errors=True)


class Split:
    """One split's shards so far and its open shard's tokens."""

    def __init__(self, name: str, shards: list[str], tokens: int, dtype: np.dtype):
        self.name, self.shards, self.tokens, self.dtype = name, shards, tokens, dtype
        self.pending: list[np.ndarray] = []
        self.doc_starts: list[int] = []
        self.open_tokens = 0

    def add(self, ids: np.ndarray, document: bool) -> None:
        if document:
            self.doc_starts.append(self.open_tokens)
        self.pending.append(ids.astype(self.dtype, copy=False))
        self.open_tokens += ids.size
        self.tokens += ids.size

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The open shard's first n tokens and their document starts; the rest stays open."""
        tokens = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        starts = np.array(self.doc_starts, dtype=np.int64)
        self.pending, self.open_tokens = [tokens[n:]] if n < tokens.size else [], max(tokens.size - n, 0)
        self.doc_starts = [int(s - n) for s in starts[starts >= n]]
        return tokens[:n], starts[starts < n]


class Preparation:
    def __init__(self, data: DataConfig, out: Path, meta: dict | None):
        self.data, self.out, self.workers = data, out, data.workers or len(os.sched_getaffinity(0))
        self.record = made_from(data)
        self.state = self._resume_state(meta)

    def _resume_state(self, meta: dict | None) -> dict:
        """Where to start: an interrupted preparation's progress, a finished one's end (to extend
        it), or the beginning, with the vocabulary learnt first."""
        progress = self.out / "progress.json"
        if progress.exists():
            state = read_json(progress) or {}
            why = cannot_continue(state, self.record, self.data)
            if why is None:
                log.info(f"continuing the preparation of {self.out} from batch {state['batches']:,}")
                return state | {"made_from": self.record}
            log.warning(f"restarting the preparation of {self.out}: {why}")
            if meta is None:
                shutil.rmtree(self.out)
            else:  # a finished folder under an unfinished extension: keep what is finished
                _remove_progress(self.out)
        if meta is not None:
            log.info(f"extending {self.out}: data.max_tokens was {meta['made_from']['max_tokens']:,}")
            return meta["progress"] | {"vocabulary": definition(meta), "made_from": self.record}
        n_text_chars = text_chars(self.data)
        state = {"vocabulary": self._learn_vocabulary(n_text_chars), "n_text_chars": n_text_chars, "position": None,
                 "batches": 0, "splits": {s: {"shards": [], "tokens": 0, "open": None} for s in SPLITS},
                 "made_from": self.record, "version": PROGRESS}
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(progress, state)  # from here on, the folder is a preparation to continue
        return state

    def _learn_vocabulary(self, n_text_chars: int) -> dict:
        data = self.data
        if data.tokenizer == "char":
            alphabet = set()
            for piece in Source(data, n_text_chars, log_skipped=False).pieces():
                alphabet.update(piece.text)
            return {"tokenizer": "char", "chars": "".join(sorted(alphabet))}
        if data.tokenizer == "bpe":
            pieces = Source(data, n_text_chars, log_skipped=False).pieces()
            return train_bpe(train_text(pieces, data.bpe_train_chars), data.bpe_vocab_size)
        try:
            tiktoken_encoding(data.tokenizer)
        except ValueError as e:
            raise UserError(f"data.tokenizer={data.tokenizer!r}: {e}") from None
        except Exception as e:  # network failure on first use
            raise UserError(f"could not load the tiktoken encoding {data.tokenizer!r} ({type(e).__name__}): it downloads "
                            "on first use; offline, point TIKTOKEN_CACHE_DIR at a folder holding its files") from None
        return {"tokenizer": data.tokenizer}

    def run(self) -> None:
        state, data = self.state, self.data
        vocabulary = state["vocabulary"]
        self.tokenizer = tokenizer_from_meta(vocabulary)
        self.fingerprint = fingerprint(vocabulary)
        dtype = token_dtype(self.tokenizer.vocab_size)
        self.splits = {s: Split(s, list(v["shards"]), v["tokens"], dtype) for s, v in state["splits"].items()}
        for s, v in state["splits"].items():  # the open shard, as the last checkpoint left it
            if v["open"]:
                tokens, starts = read_shard(self.out / v["open"])
                self.splits[s].add(np.array(tokens), False)
                self.splits[s].doc_starts = starts.tolist()
        source = Source(data, state["n_text_chars"])
        batches = self._batches(source, state["position"])
        exhausted = True
        with ThreadPoolExecutor(self.workers, thread_name_prefix="encode") as pool:
            # a few batches in flight, taken in order: memory stays bounded, the output does not
            # depend on how many threads encode
            flight = deque()
            for batch, position in batches:
                flight.append((pool.submit(self.tokenizer.encode_pieces, [p.text for p in batch], [p.document for p in batch]),
                               batch, position))
                if len(flight) > 2 * self.workers:
                    if not self._take(*flight.popleft()):
                        exhausted = False
                        break
            while flight and exhausted:
                exhausted = self._take(*flight.popleft())
            for future, _, _ in flight:
                future.cancel()
        self._finish(exhausted)

    def _batches(self, source: Source, position: dict | None) -> Iterator[tuple[list, dict]]:
        pieces = source.pieces(position)
        while batch := list(islice(pieces, BATCH_PIECES)):
            yield batch, source.position()

    def _take(self, future, batch, position) -> bool:
        """Add an encoded batch to its splits' shards; False once data.max_tokens is reached."""
        completed = False
        for piece, ids in zip(batch, future.result()):
            split = self.splits[piece.split]
            split.add(ids, piece.document)
            while split.open_tokens >= self.data.shard_tokens:
                self._write_shard(split, self.data.shard_tokens)
                completed = True
        self.state["position"], self.state["batches"] = position, self.state["batches"] + 1
        if completed:
            self._checkpoint()
        budget = self.data.max_tokens
        return budget is None or sum(s.tokens for s in self.splits.values()) < budget

    def _write_shard(self, split: Split, n: int) -> str:
        name = f"{split.name}_{len(split.shards):06d}.bin"
        write_shard(self.out / name, *split.take(n), self.fingerprint)
        split.shards.append(name)
        return name

    def _checkpoint(self) -> None:
        """Record the open shards (as .partial files named by the batch count) and the position."""
        k = self.state["batches"]
        for name, split in self.splits.items():
            open_file = None
            if split.open_tokens:
                open_file = f"{name}.partial-{k}"
                tokens = np.concatenate(split.pending)
                write_shard(self.out / open_file, tokens, np.array(split.doc_starts, dtype=np.int64), self.fingerprint)
            self.state["splits"][name] = {"shards": list(split.shards), "tokens": split.tokens - split.open_tokens,
                                          "open": open_file}
        write_json(self.out / "progress.json", self.state)
        log.info(f"{self.out}: {sum(s.tokens for s in self.splits.values()):,} tokens, "
                 f"{sum(len(s.shards) for s in self.splits.values())} shards")
        for f in self.out.glob("*.partial-*"):
            if not f.name.endswith(f"-{k}"):
                f.unlink()

    def _finish(self, exhausted: bool) -> None:
        for split in self.splits.values():
            if split.open_tokens:
                self._write_shard(split, split.open_tokens)
            if not split.shards:
                raise UserError(f"the {split.name} split of {self.data.source or self.data.hf_dataset} is empty: "
                                "add data, or change data.val_fraction")
        position = self.state["position"] or {}
        rows, bad_rows, expected = position.get("rows", 0), position.get("bad_rows", 0), self.data.expected_documents
        if bad_rows:
            log.warning(f"{self.out}: {bad_rows:,} bad rows left out (data.bad_rows=skip); meta.json records the count")
        if exhausted and expected is not None and rows != expected:
            log.warning(f"{self.data.hf_dataset or self.data.source} holds {rows:,} documents; the full set has "
                        f"{expected:,}: this copy is partial")
        split_meta = {s: {"shards": sp.shards, "tokens": sp.tokens} for s, sp in self.splits.items()}
        # extending starts again from the last shards, which the budget may have cut short
        progress = self.state | {"splits": {s: {"shards": sp.shards[:-1], "tokens": sp.tokens - self._last(sp),
                                                "open": sp.shards[-1]} for s, sp in self.splits.items()}}
        del progress["vocabulary"], progress["made_from"]
        meta = self.state["vocabulary"] | {
            "layout": LAYOUT, "vocab_size": self.tokenizer.vocab_size, "dtype": token_dtype(self.tokenizer.vocab_size).name,
            "train_tokens": self.splits["train"].tokens, "val_tokens": self.splits["val"].tokens,
            "splits": split_meta, "rows": rows, "bad_rows": bad_rows, "exhausted": exhausted, "made_from": self.record, "progress": progress,
        }
        write_json(self.out / "meta.json", meta)
        _remove_progress(self.out)

    def _last(self, split: Split) -> int:
        return read_shard(self.out / split.shards[-1])[0].size


def train_text(pieces: Iterator, limit: int) -> Iterator[str]:
    """The train pieces' text, up to about limit characters."""
    seen = 0
    for piece in pieces:
        if piece.split == "train":
            yield piece.text
            seen += len(piece.text)
            if seen >= limit:
                return


def main() -> None:
    import hydra

    from nanogpt.cli import job, run_cli

    @hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
    @job
    def _main(cfg) -> None:
        from nanogpt.config import to_train_config

        data = to_train_config(cfg).data
        path = prepare(data)
        meta = load_meta(path)
        shards = sum(len(s["shards"]) for s in meta["splits"].values())
        print(f"{path}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens in {shards} shards, "
              f"vocabulary {meta['vocab_size']:,}")

    run_cli(_main)


if __name__ == "__main__":
    main()
