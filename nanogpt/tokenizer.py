"""Tokenizers named by a data folder's meta.json: characters, or a tiktoken encoding (GPT-2 BPE)."""

from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class CharTokenizer:
    """One token per character of a fixed alphabet (sorted, as nanoGPT's shakespeare_char)."""

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

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


class TiktokenTokenizer:
    def __init__(self, encoding: str):
        import tiktoken  # its first use downloads the BPE files (or reads TIKTOKEN_CACHE_DIR)

        self.enc = tiktoken.get_encoding(encoding)
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["chars"])
    return TiktokenTokenizer(meta["tokenizer"])
