"""Text -> token memmaps: <root>/<name>/{train.bin, val.bin, meta.json}.

Streams: the text is read in chunks of about a megabyte, so memory stays bounded however large
the input; BPE chunks are encoded on all cores. The folder appears atomically (built under a
temporary name, then renamed), so an interrupted preparation leaves nothing a later run trips on;
the next preparation removes what a dead one left.

meta.json records what the folder was made from (each source's path, size, modification time and
SHA-256, or the dataset's name; the tokenizer; the split). Every start compares that record with
the run's data settings: a folder is never silently used for other data, nor prepared again in
place unless data.reprepare=true says so (older runs and other jobs of a sweep may be reading it).

    python -m nanogpt.prepare data=shakespeare
"""

import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nanogpt.config import DataConfig
from nanogpt.errors import UserError
from nanogpt.rundir import pid_alive
from nanogpt.tokenizer import CharTokenizer, TiktokenTokenizer

CHUNK_CHARS = 1 << 20
# formats that are not text, by their first bytes; a reader for each comes with the data issue
BINARY_MAGIC = {b"PAR1": "a parquet file", b"\x1f\x8b": "gzip-compressed", b"PK\x03\x04": "a zip archive"}

log = logging.getLogger("nanogpt")


def data_dir(data: DataConfig) -> Path:
    return Path(data.root).expanduser() / data.name


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare(data: DataConfig, num_threads: int | None = None) -> Path:
    """Prepare the data folder if it is not there yet, or again if data.reprepare=true and it was
    made from other settings; return its path."""
    out = data_dir(data)
    remove_dead_leftovers(out)
    if (out / "meta.json").exists():
        why = stale(load_meta(out), data)
        if why is None:
            return out
        if not data.reprepare:
            raise UserError(f"data folder {out} was prepared from other data ({why}): choose another data.name, "
                            "or set data.reprepare=true to prepare it again")
        log.warning(f"preparing {out} again: {why}")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"data folder {out} exists but has no meta.json: remove it or point data.root elsewhere")
    tmp = out.with_name(f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        threads = num_threads or len(os.sched_getaffinity(0))
        meta = _prepare_hf(data, tmp, threads) if data.hf_dataset else _prepare_files(data, tmp, threads)
        (tmp / "meta.json").write_text(json.dumps(meta | {"made_from": made_from(data)}, indent=1))
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _install(tmp: Path, out: Path) -> None:
    """tmp becomes out in one rename; an old out (data.reprepare) is moved aside first."""
    old = out.with_name(f".{out.name}.old-{socket.gethostname()}-{os.getpid()}")
    if (out / "meta.json").exists():
        out.rename(old)
    try:
        if out.exists():
            out.rmdir()  # an empty folder left by hand
        tmp.rename(out)
    except OSError:
        if not (out / "meta.json").exists():  # not a concurrent job that finished first
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def made_from(data: DataConfig) -> dict:
    """What a folder prepared with these settings is made from."""
    record = {"tokenizer": data.tokenizer, "val_fraction": data.val_fraction, "hf_dataset": data.hf_dataset}
    if not data.hf_dataset:
        record["sources"] = [
            {"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns, "sha256": sha256(f)}
            for f in source_files(data.source)
        ]
    return record


def stale(meta: dict, data: DataConfig) -> str | None:
    """Why a prepared folder does not hold what these settings would make, or None. A source
    counts as the same when its path, size and modification time are, or its contents."""
    record = meta.get("made_from")
    if record is None:  # prepared before folders kept a record: it can only be trusted
        return None
    for key in ("tokenizer", "val_fraction", "hf_dataset"):
        if record[key] != getattr(data, key):
            return f"data.{key} was {record[key]!r}, now {getattr(data, key)!r}"
    if data.hf_dataset:
        return None
    files, sources = source_files(data.source), record["sources"]
    if len(files) != len(sources):
        return f"{len(sources)} source files then, {len(files)} now"
    for f, then in zip(files, sources):
        now = f.stat()
        same_file = (str(f.resolve()), now.st_mtime_ns) == (then["path"], then["mtime_ns"])
        if now.st_size != then["size"] or not (same_file or sha256(f) == then["sha256"]):
            return f"{f} is not the {then['path']} it was prepared from"
    return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def remove_dead_leftovers(out: Path) -> None:
    """Temporary folders of preparations of `out` whose process died on this host. A living one's
    are never touched: it may be preparing right now."""
    prefix = f".{out.name}."
    for p in out.parent.glob(f"{prefix}*-{socket.gethostname()}-*") if out.parent.exists() else ():
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def source_files(sources: list[str]) -> list[Path]:
    """The text files data.source names (folders: every file below, in order); anything that is
    not text is refused, never read as characters."""
    if not sources:
        raise UserError("data.source is empty: name text files or folders, e.g. data.source=[notes/,book.txt]")
    files = []
    for s in sources:
        p = Path(s).expanduser()
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"data.source: {s} does not exist")
    if not files:
        raise UserError(f"data.source {sources} holds no files")
    for f in files:
        kind = not_text(f)
        if kind:
            raise UserError(f"data.source: {f} is {kind}, not text: name text files (other formats have no reader yet)")
    return files


def not_text(path: Path) -> str | None:
    """What a file is when it is not text, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(8192)
    kind = next((k for magic, k in BINARY_MAGIC.items() if head.startswith(magic)), None)
    return kind or ("binary (it holds NUL bytes)" if b"\0" in head else None)


def read_chunks(files: list[Path]) -> Iterator[str]:
    """The files' text, in chunks of about CHUNK_CHARS that end at a line break."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            while chunk := f.read(CHUNK_CHARS):
                yield chunk + f.readline()


def split_chunks(files: list[Path], n_train: int) -> Iterator[tuple[str, str]]:
    """(split, text) pieces: the first n_train characters are train, the rest val."""
    seen = 0
    for chunk in read_chunks(files):
        if seen + len(chunk) <= n_train:
            yield "train", chunk
        elif seen >= n_train:
            yield "val", chunk
        else:
            yield "train", chunk[: n_train - seen]
            yield "val", chunk[n_train - seen :]
        seen += len(chunk)


def _prepare_files(data: DataConfig, out: Path, num_threads: int) -> dict:
    files = source_files(data.source)
    # pass 1: count characters (for the split) and, for char tokenizers, the alphabet
    n_chars, alphabet = 0, set()
    for chunk in read_chunks(files):
        n_chars += len(chunk)
        if data.tokenizer == "char":
            alphabet.update(chunk)
    if n_chars == 0:
        raise UserError(f"data.source {data.source} is empty")
    n_train = int(n_chars * (1 - data.val_fraction))

    if data.tokenizer == "char":
        tok = CharTokenizer("".join(sorted(alphabet)))
        meta = {"tokenizer": "char", "chars": tok.chars}
        encode_batch = lambda texts: [tok.encode_array(t) for t in texts]  # noqa: E731
    else:
        tok = _tiktoken(data.tokenizer)
        meta = {"tokenizer": data.tokenizer}
        encode_batch = lambda texts: tok.enc.encode_ordinary_batch(texts, num_threads=num_threads)  # noqa: E731
    dtype = token_dtype(tok.vocab_size)

    # pass 2: encode batches of chunks (one per thread and then some) and append to the split's file
    counts = {"train": 0, "val": 0}
    with open(out / "train.bin", "wb") as f_train, open(out / "val.bin", "wb") as f_val:
        sinks = {"train": f_train, "val": f_val}
        pending: list[tuple[str, str]] = []

        def flush():
            for (split, _), ids in zip(pending, encode_batch([t for _, t in pending])):
                np.asarray(ids, dtype=dtype).tofile(sinks[split])
                counts[split] += len(ids)
            pending.clear()

        for piece in split_chunks(files, n_train):
            pending.append(piece)
            if len(pending) >= 4 * num_threads:
                flush()
        flush()
    return meta | {
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "source": [str(f) for f in files],
    }


def _tiktoken(encoding: str) -> TiktokenTokenizer:
    try:
        return TiktokenTokenizer(encoding)
    except ValueError as e:
        raise UserError(f"data.tokenizer={encoding!r}: {e}") from None
    except Exception as e:  # network failure on first use
        raise UserError(
            f"could not load the tiktoken encoding {encoding!r} ({type(e).__name__}): it downloads on first use; "
            "offline, point TIKTOKEN_CACHE_DIR at a folder holding its files"
        ) from None


def _prepare_hf(data: DataConfig, out: Path, num_threads: int) -> dict:
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError(f"data={data.name} needs Hugging Face datasets: pip install -e '.[hf]'") from None
    tok = _tiktoken(data.tokenizer)
    try:
        ds = load_dataset(data.hf_dataset, num_proc=num_threads)["train"]
    except Exception as e:
        raise UserError(
            f"could not load the Hugging Face dataset {data.hf_dataset!r} ({type(e).__name__}: {e}); "
            "its first download needs the network"
        ) from None
    splits = ds.train_test_split(test_size=data.val_fraction, seed=2357, shuffle=True)
    dtype, counts = token_dtype(tok.vocab_size), {}
    for split, part in (("train", splits["train"]), ("val", splits["test"])):
        counts[split] = 0
        with open(out / f"{split}.bin", "wb") as f:
            for batch in part.iter(batch_size=1024):
                # each document ends with <|endoftext|>, as nanoGPT's openwebtext/prepare.py
                for ids in tok.enc.encode_ordinary_batch(batch["text"], num_threads=num_threads):
                    ids.append(tok.eot_token)
                    np.asarray(ids, dtype=dtype).tofile(f)
                    counts[split] += len(ids)
    return {
        "tokenizer": data.tokenizer,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "source": [f"hf:{data.hf_dataset}"],
    }


def load_meta(path: Path) -> dict:
    """A data folder's meta.json (JSON, never pickle: opening a folder runs no code)."""
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise UserError(f"no prepared data in {path}: run python -m nanogpt.prepare data=<name> (or just train)")
    try:
        meta = json.loads(meta_file.read_text())
        meta["vocab_size"], meta["dtype"] = int(meta["vocab_size"]), str(meta["dtype"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_file} is not a valid vocabulary file ({e}); prepare the data again") from None
    return meta


def main() -> None:
    import hydra

    from nanogpt.cli import job, run_cli

    @hydra.main(version_base="1.3", config_path="../conf", config_name="config")
    @job
    def _main(cfg) -> None:
        from nanogpt.config import to_train_config

        data = to_train_config(cfg).data
        path = prepare(data)
        meta = load_meta(path)
        print(f"{path}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, vocabulary {meta['vocab_size']:,}")

    run_cli(_main)


if __name__ == "__main__":
    main()
