"""Token shards on disk, and the token stream a split's shards make together.

A shard is one file: a 256-byte header, its tokens, then the offsets (within the shard) at which
documents start. The header says what the bytes are, so a shard read alone cannot be misread:

    magic b"NANOGPT-TOKENS\\0\\0" | version, token itemsize, token count, document count (int64)
    | the tokenizer's SHA-256 | zero padding

Shards are written to a temporary name and renamed: a file with a shard's name is complete.
"""

import os
from pathlib import Path

import numpy as np

from nanogpt.errors import UserError

MAGIC = b"NANOGPT-TOKENS\0\0"
VERSION = 1
HEADER_BYTES = 256


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_shard(path: Path, tokens: np.ndarray, doc_starts: np.ndarray, fingerprint: bytes) -> None:
    header = bytearray(HEADER_BYTES)
    fields = np.array([VERSION, tokens.dtype.itemsize, tokens.size, doc_starts.size], dtype="<i8").tobytes()
    header[: len(MAGIC) + 32 + 32] = MAGIC + fields + fingerprint
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(tokens.tobytes())
        f.write(doc_starts.astype("<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path: Path) -> tuple[np.dtype, int, int, bytes]:
    """(token dtype, token count, document count, tokenizer fingerprint) of a shard, checked whole."""
    why = shard_problem(path)
    if why:
        raise UserError(f"{why}: prepare the data again (data.reprepare=true)")
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    _, itemsize, n_tokens, n_docs = np.frombuffer(header, "<i8", 4, len(MAGIC))
    fingerprint = header[len(MAGIC) + 32 : len(MAGIC) + 64]
    return np.dtype(np.uint16 if itemsize == 2 else np.uint32), int(n_tokens), int(n_docs), fingerprint


def shard_problem(path: Path) -> str | None:
    """Why a file is not a whole shard: missing, not a shard, another version, or not the size its
    header says (a copy or a disk cut it short)."""
    try:
        with open(path, "rb") as f:
            header, size = f.read(HEADER_BYTES), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return f"{path} is missing"
    if len(header) < HEADER_BYTES or not header.startswith(MAGIC):
        return f"{path} is not a token shard"
    version, itemsize, n_tokens, n_docs = (int(v) for v in np.frombuffer(header, "<i8", 4, len(MAGIC)))
    if version != VERSION:
        return f"{path} is a version {version} shard; this code reads version {VERSION}"
    expected = HEADER_BYTES + n_tokens * itemsize + n_docs * 8
    if size != expected:
        return f"{path} holds {size:,} bytes, not the {expected:,} its header says"
    return None


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A shard's tokens (a read-only memory map) and document starts."""
    dtype, n_tokens, n_docs, _ = read_header(path)
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
    docs = np.fromfile(path, dtype="<i8", count=n_docs, offset=HEADER_BYTES + n_tokens * dtype.itemsize)
    return tokens, docs


class TokenStream:
    """A split's shards as one sequence of tokens: windows may cross from one shard into the next."""

    def __init__(self, files: list[Path], fingerprint: bytes):
        if not files:
            raise UserError("a split has no shards: prepare the data again (data.reprepare=true)")
        self.files, self.headers = files, []
        for f in files:
            self.headers.append(read_header(f))
            if self.headers[-1][3] != fingerprint:
                raise UserError(f"{f} was encoded with another tokenizer than its folder's meta.json says")
        # shard k holds tokens bounds[k]:bounds[k+1] of the stream
        self.bounds = np.concatenate([[0], np.cumsum([h[1] for h in self.headers])])
        self.size = int(self.bounds[-1])

    def _tokens(self, k: int) -> np.ndarray:
        # mapped afresh for each batch, as nanoGPT does: a long-lived memmap's pages count as leaked memory
        dtype, n_tokens, _, _ = self.headers[k]
        return np.memmap(self.files[k], dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))

    def document_starts(self) -> np.ndarray:
        """Every document's first token (an <|endoftext|> where the tokenizer has one), in stream positions."""
        return np.concatenate([read_shard(f)[1] + self.bounds[k] for k, f in enumerate(self.files)])

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """The (len(starts), length) tokens from each start on, as int64."""
        out = np.empty((len(starts), length), dtype=np.int64)
        shard = np.searchsorted(self.bounds, starts, side="right") - 1
        offsets = np.arange(length)
        for k in np.unique(shard):
            tokens, base = self._tokens(k), self.bounds[k]
            rows = np.flatnonzero(shard == k)
            inside = rows[starts[rows] + length <= self.bounds[k + 1]]
            out[inside] = tokens[starts[inside, None] - base + offsets]  # one gather for the whole shard
            for r in np.setdiff1d(rows, inside):  # a window that runs into the next shard(s)
                out[r] = self._crossing(int(starts[r]), length)
        return out

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The tokens at these stream positions, as int64 (one gather per shard)."""
        out = np.empty(len(positions), dtype=np.int64)
        shard = np.searchsorted(self.bounds, positions, side="right") - 1
        for k in np.unique(shard):
            at = shard == k
            out[at] = self._tokens(k)[positions[at] - self.bounds[k]]
        return out

    def _crossing(self, start: int, length: int) -> np.ndarray:
        parts, pos = [], start
        while pos < start + length:
            k = int(np.searchsorted(self.bounds, pos, side="right") - 1)
            end = min(start + length, int(self.bounds[k + 1]))
            parts.append(np.asarray(self._tokens(k)[pos - self.bounds[k] : end - self.bounds[k]]))
            pos = end
        return np.concatenate(parts)
