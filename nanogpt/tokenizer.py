"""Tokenizers, as a data folder's meta.json defines them: characters, a tiktoken encoding (the
GPT-2 BPE), or a byte-level BPE trained on the data (rustbpe learns it; tiktoken encodes with it).

meta.json holds the whole definition (a trained BPE's ranks too), and checkpoints carry meta, so a
run's tokenizer travels with its weights.
"""

import base64
import hashlib
import json
import logging
from collections.abc import Iterable
from typing import Protocol

import numpy as np

EOT = "<|endoftext|>"

log = logging.getLogger("nanogpt")


class Tokenizer(Protocol):
    vocab_size: int
    eot_token: int | None  # the token before each document; None: documents are not marked

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_pieces(self, texts: list[str], documents: list[bool]) -> list[np.ndarray]: ...

    def token_bytes(self) -> np.ndarray: ...


class CharTokenizer:
    """One token per character of a fixed alphabet (sorted, as nanoGPT's shakespeare_char)."""

    eot_token = None

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        # code point -> token id, for vectorised encoding of large chunks
        self.table = np.full(max(map(ord, chars), default=0) + 1, -1, dtype=np.int64)
        self.table[[ord(c) for c in chars]] = np.arange(len(chars))

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = self.table[np.minimum(codes, self.table.size - 1)]
        if (ids < 0).any() or (codes >= self.table.size).any():
            unknown = sorted(set(text) - set(self.chars))
            raise ValueError(f"characters outside the vocabulary: {''.join(unknown)[:40]!r}")
        return ids

    def encode_pieces(self, texts: list[str], documents: list[bool]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self) -> np.ndarray:
        """The UTF-8 length of each token's text (bits per byte divides by these)."""
        return np.array([len(c.encode()) for c in self.chars], dtype=np.int64)


class TiktokenTokenizer:
    """A tiktoken encoding: a named one (gpt2), or a trained BPE's."""

    def __init__(self, enc):
        self.enc = tiktoken_encoding(enc) if isinstance(enc, str) else enc
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={EOT})

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def token_bytes(self) -> np.ndarray:
        """The bytes each token stands for; 0 for special tokens, which stand for no text."""
        special = {self.enc.encode_single_token(t) for t in self.enc.special_tokens_set}
        return np.array([0 if i in special else len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)],
                        dtype=np.int64)

    def encode_pieces(self, texts: list[str], documents: list[bool]) -> list[np.ndarray]:
        """Each text encoded on its own, a document's with <|endoftext|> before it. One call into
        tiktoken for the lot, outside the GIL: the texts joined by <|endoftext|>, which tiktoken
        encodes apart, and the separators before texts that do not start a document dropped."""
        if any(EOT in t for t in texts):  # a text that spells the separator: each on its own
            return [np.array(([self.eot_token] if d else []) + self.enc.encode_ordinary(t), dtype=np.int64)
                    for t, d in zip(texts, documents)]
        ids = self.enc.encode_to_numpy("".join(EOT + t for t in texts), allowed_special={EOT}, disallowed_special=())
        bounds = np.append(np.flatnonzero(ids == self.eot_token), ids.size)
        return [ids[a + (not d) : b] for a, b, d in zip(bounds[:-1], bounds[1:], documents)]


def tiktoken_encoding(name: str):
    import tiktoken  # its first use downloads the BPE files (or reads TIKTOKEN_CACHE_DIR)

    enc = tiktoken.get_encoding(name)
    if EOT not in enc.special_tokens_set:
        raise ValueError(f"the encoding {name} has no {EOT} token to mark documents with")
    return enc


def train_bpe(texts: Iterable[str], vocab_size: int) -> dict:
    """A byte-level BPE of vocab_size tokens learnt from texts: 256 bytes (so every text stays
    encodable), vocab_size - 257 merges, then <|endoftext|>. Returns its meta.json definition."""
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - 1)
    ranks = sorted(((bytes(token), rank) for token, rank in trainer.get_mergeable_ranks()), key=lambda t: t[1])
    # tiktoken's own file format for ranks: one "base64(token) rank" a line
    if len(ranks) < vocab_size - 1:
        log.warning(f"the text holds no more pairs to merge: a vocabulary of {len(ranks) + 1} tokens, not {vocab_size}")
    lines = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks)
    return {"tokenizer": "bpe", "pattern": trainer.get_pattern(), "ranks": lines}


def bpe_encoding(meta: dict):
    import tiktoken

    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in meta["ranks"].splitlines())}
    return tiktoken.Encoding("bpe", pat_str=meta["pattern"], mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


def definition(meta: dict) -> dict:
    """The keys of meta that define its tokenizer."""
    keys = {"char": ("chars",), "bpe": ("pattern", "ranks")}.get(meta["tokenizer"], ())
    return {"tokenizer": meta["tokenizer"]} | {k: meta[k] for k in keys}


def fingerprint(meta: dict) -> bytes:
    """32 bytes that differ between any two tokenizers (a named tiktoken encoding's files are
    hash-checked by tiktoken, so its name is enough)."""
    return hashlib.sha256(json.dumps(definition(meta), sort_keys=True).encode()).digest()


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["chars"])
    if meta["tokenizer"] == "bpe":
        return TiktokenTokenizer(bpe_encoding(meta))
    return TiktokenTokenizer(meta["tokenizer"])
