"""Evaluation tasks as data: what each task reads, where its file comes from, and its examples
rendered as tokens. Scoring them with a model is nanogpt/evaluation.py's job.

A multiple-choice task is a jsonl file of rows {"context": ..., "choices": [...], "label": i}
and an entry in conf/eval/ that names it (`path`, or `url` + `checksum` to download it once into
eval.cache_dir). A row may carry its own solved examples to show first ("fewshot": [{"context",
"choices", "label"}, ...]); `fewshot: k` shows k others drawn from the file instead. HellaSwag's
official rows ({"ctx", "endings", "label"}) are read with `format: hellaswag`.

Each choice is scored as a completion: the tokens of the context, then those of `join + choice`,
the loss taken over the choice's tokens only (build-nanogpt's and llm.c's HellaSwag scoring).
"""

import hashlib
import logging
import os
import random
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from nanogpt import jsonl
from nanogpt.config import BitsPerByteConfig, ChoiceTaskConfig
from nanogpt.errors import UserError
from nanogpt.tokenizer import Tokenizer

log = logging.getLogger("nanogpt")
T = TypeVar("T")


@dataclass
class Example:
    context: str
    choices: list[str]
    label: int
    fewshot: list["Example"] | None = None  # solved examples shown before this one
    where: str = ""  # file:line, for messages


@dataclass
class Rendered:
    """One example as token rows: row i is the context then choice i; the targets of row i's
    choice tokens are rows[i][start[i]:] (what the loss is taken over)."""

    rows: list[np.ndarray]
    starts: list[int]  # index of each row's first choice token
    label: int
    cut: bool  # the row was longer than the model's block: its start was cut away


class BitsPerByteTask:
    """Bits per byte on a split of the data folder: windows of block_size tiling it from its start."""

    def __init__(self, config: BitsPerByteConfig, name: str, cache_dir: str):
        self.config, self.name = config, name


class ChoiceTask:
    """A multiple-choice task of the eval group: its file, found or downloaded at start-up."""

    def __init__(self, config: ChoiceTaskConfig, name: str, cache_dir: str):
        self.config, self.name, self.cache_dir = config, name, Path(cache_dir).expanduser()

    @property
    def file(self) -> Path:
        c = self.config
        return Path(c.path).expanduser() if c.path else self.cache_dir / self.name / Path(c.url).name

    def fetch(self) -> Path:
        """The task's file: its local path, else the cached download, else downloaded now. A file
        that cannot be had stops the run here, naming the setting that points at a local copy."""
        c, file = self.config, self.file
        if c.path:
            if not file.is_file():
                raise UserError(f"eval task {self.name}: no file at eval.tasks.{self.name}.path={c.path}")
            return file
        if file.is_file():
            return file
        try:
            download(c.url, file, c.checksum)
        except (OSError, ValueError) as e:
            raise UserError(
                f"eval task {self.name}: cannot download {c.url} ({e}); copy the file to this machine and set "
                f"eval.tasks.{self.name}.path=<file>"
            ) from None
        return file

    def examples(self) -> list[Example]:
        """The task's examples (the first `limit`), each with its few-shot examples."""
        c = self.config
        examples = read_examples(self.fetch(), c.format)
        pool = read_examples(Path(c.fewshot_path), c.format) if c.fewshot_path else examples
        chosen = examples[: c.limit] if c.limit else examples
        if c.fewshot:
            for i, ex in enumerate(chosen):
                if ex.fewshot is None:  # the row's own examples win; else k others of the pool, the same every run
                    others = [j for j in random.Random(i).sample(range(len(pool)), min(c.fewshot + 1, len(pool)))
                              if pool[j] is not ex][: c.fewshot]
                    ex.fewshot = [pool[j] for j in others]
        for ex in chosen:
            if not ex.context and not ex.fewshot:
                raise UserError(f"{ex.where}: an empty context and no few-shot examples before it: the choices' "
                                "first tokens have nothing to be predicted from")
        return chosen

    def render(self, ex: Example, tokenizer: Tokenizer, block_size: int) -> Rendered:
        """Token rows of an example, cut from the left to block_size + 1 tokens (the model predicts
        each token from at most block_size before it). Raises ValueError for text the tokenizer
        cannot encode (a character vocabulary's unknown characters)."""
        c = self.config
        shots = "".join(s.context + c.join + s.choices[s.label] + c.fewshot_separator for s in ex.fewshot or [])
        context = tokenizer.encode(shots + ex.context)
        if not context:
            raise ValueError("an empty context: its choice's first token has nothing to be predicted from")
        rows, starts, cut = [], [], False
        for choice in ex.choices:
            tokens = context + tokenizer.encode(c.join + choice)
            start = len(context)
            if len(tokens) > block_size + 1:
                drop = len(tokens) - (block_size + 1)
                tokens, start, cut = tokens[drop:], max(start - drop, 1), True
            rows.append(np.asarray(tokens, dtype=np.int64))
            starts.append(start)
        return Rendered(rows, starts, ex.label, cut)


def read_examples(path: Path, format: str) -> list[Example]:
    """A task file's rows as Examples; `hellaswag`: the official rows (ctx, endings, label)."""
    return read_rows(path, lambda row, where: _example(row, format, where), ROW_KEYS[format])


ROW_KEYS = {"choices": '{"context": str, "choices": [str, ...], "label": int}',
            "hellaswag": '{"ctx": str, "endings": [str, ...], "label": int}'}


def read_rows(path: Path, parse: Callable[[dict, str], T], shape: str) -> list[T]:
    """Every row of a task's jsonl file through parse(row, "file:line"). A line that is not a JSON
    object, or a row parse refuses (KeyError: a missing key; TypeError, ValueError: a wrong value,
    its message the reason), stops with one line naming the file, the line and the row's shape;
    so does a file without rows. Every task format reads its file with this."""
    out = []
    for n, row in jsonl.rows(path):
        try:
            out.append(parse(row, f"{path}:{n}"))
        except (KeyError, TypeError, ValueError) as e:
            reason = f"no {e} key" if isinstance(e, KeyError) else str(e)
            raise UserError(f"{path}:{n}: {reason}; a row is {shape}") from None
    if not out:
        raise UserError(f"{path}: no examples: a task file holds one JSON object a line, {shape}")
    return out


def _example(row, format: str, where: str = "") -> Example:
    if not isinstance(row, dict):
        raise TypeError(f"a JSON {type(row).__name__} where an example belongs")
    context, choices = ("ctx", "endings") if format == "hellaswag" else ("context", "choices")
    ex = Example(_text(row[context], context), _choices(row[choices], choices), _label(row["label"]), where=where)
    if not 0 <= ex.label < len(ex.choices):
        raise ValueError(f"label {ex.label} is not one of the {len(ex.choices)} choices (0 to {len(ex.choices) - 1})")
    if format != "hellaswag" and "fewshot" in row:
        if not isinstance(row["fewshot"], list):
            raise TypeError("fewshot is not a list of solved examples")
        ex.fewshot = [_example(s, format, where) for s in row["fewshot"]]
    return ex


def _text(value, key: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{key} is {type(value).__name__}, not a string")
    return value


def _choices(value, key: str) -> list[str]:
    if not isinstance(value, list) or len(value) < 2:
        raise TypeError(f"{key} is not a list of at least two strings")
    for i, choice in enumerate(value):
        if not _text(choice, f"{key}[{i}]"):
            raise ValueError(f"{key}[{i}] is an empty string: an empty choice has no tokens to score")
    return value


def _label(value) -> int:
    """An int, or a string of one (some copies of HellaSwag store "3")."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise TypeError(f"label {value!r} is not the index of a choice")


def download(url: str, dest: Path, checksum: str | None) -> None:
    """url into dest, whole or not at all: written to a temporary file, checked, then renamed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        if checksum:
            got = file_checksum(Path(tmp), checksum.partition(":")[0])
            if got != checksum:
                raise ValueError(f"checksum mismatch: expected {checksum}, got {got}")
        os.replace(tmp, dest)
        log.info(f"downloaded {url} -> {dest}")
    finally:
        Path(tmp).unlink(missing_ok=True)


def file_checksum(path: Path, kind: str) -> str:
    """`sha256:<hex>`, or `git-sha1:<hex>`: the id git gives the file's content, which a
    repository's tree lists for every file (how a file served from GitHub is pinned)."""
    data = path.read_bytes()
    if kind == "sha256":
        return "sha256:" + hashlib.sha256(data).hexdigest()
    if kind == "git-sha1":
        return "git-sha1:" + hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    raise ValueError(f"unknown checksum kind {kind!r}: sha256:<hex> or git-sha1:<hex>")
