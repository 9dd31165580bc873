"""Evaluation tasks as data: what each task reads, where its file comes from, and its examples
rendered as tokens. Scoring them with a model is nanogpt/evaluation.py's job.

A multiple-choice task is a jsonl file of rows {"context": ..., "choices": [...], "label": i}
and an entry in conf/eval/ that names it (`path`, or `url` + `checksum` to download it once into
eval.cache_dir). A row may carry its own solved examples to show first ("fewshot": [{"context",
"choices", "label"}, ...]); `fewshot: k` shows k others drawn from the file instead. HellaSwag's
official rows ({"ctx", "endings", "label"}) are read with `format: hellaswag`.

Each choice is scored as a completion: the tokens of the context, then those of `join + choice`,
the loss taken over the choice's tokens only (build-nanogpt's and llm.c's HellaSwag scoring).

CORE (DCLM's in-context tasks) is read from the DCLM eval bundle's own layout and rendered as
nanochat's reference renders it (`nanochat/core_eval.py`, `scripts/base_eval.py`). An lm-eval task
is lm-evaluation-harness's own: here its names are checked and its documents loaded at start-up.
"""

import csv
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
import yaml

from nanogpt import jsonl
from nanogpt.config import BitsPerByteConfig, ChoiceTaskConfig, CoreConfig, LmEvalConfig
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


class LmEvalTask:
    """Tasks of lm-evaluation-harness (`pip install -e '.[lmeval]'`), scored through its `LM`
    interface (nanogpt/harness.py). Their names are checked and their documents loaded at
    start-up; offline, a task YAML of include_path reads local files (dataset_path: json)."""

    def __init__(self, config: LmEvalConfig, name: str, cache_dir: str):
        self.config, self.name = config, name
        self.manager = None  # lm-eval's TaskManager: its index of task YAMLs

    def load(self, tokenizer: Tokenizer) -> None:
        c, key = self.config, f"eval.tasks.{self.name}"
        if tokenizer.eot_token is None:
            raise UserError(f"eval task {self.name}: lm-eval's requests start from the end-of-text token, which the "
                            "model's vocabulary (characters) lacks")
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise UserError(f"eval task {self.name} needs lm-evaluation-harness: pip install -e '.[lmeval]'") from None
        manager = None
        if c.include_path:  # lm-eval's own index takes ~10 s to build: skipped when the folder has every task
            manager = TaskManager(include_path=c.include_path, include_defaults=False)
        if manager is None or not all(manager.match_tasks([t]) for t in c.tasks):
            manager = TaskManager(include_path=c.include_path)
        unknown = [t for t in c.tasks if not manager.match_tasks([t])]
        if unknown:
            raise UserError(f"{key}.tasks: lm-eval has no task {unknown[0]!r} (its tasks: lm-eval ls tasks; your own "
                            f"YAMLs: {key}.include_path=<folder>)")
        try:
            manager.load(list(c.tasks))  # reads the documents now: a missing file stops the run here
        except Exception as e:  # lm-eval and datasets raise many kinds; the first line says which
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise UserError(f"eval task {self.name}: lm-eval cannot load {', '.join(c.tasks)}: {reason}") from None
        self.manager = manager


CORE_ROWS = {  # icl_task_type: the keys of its rows
    "multiple_choice": '{"query": str, "choices": [str, ...], "gold": int}',
    "schema": '{"context_options": [str, ...], "continuation": str, "gold": int}',
    "language_modeling": '{"context": str, "continuation": str}',
}


@dataclass
class CoreSubtask:
    """One task of core.yaml, its rows shuffled as the reference shuffles them (and cut to limit)."""

    label: str
    kind: str  # icl_task_type: multiple_choice | schema | language_modeling
    num_fewshot: int
    delimiter: str  # between a context and its continuation
    baseline: float  # the accuracy of chance, in percent (eval_meta_data.csv's "Random baseline")
    rows: list[dict]


@dataclass
class CoreExample:
    """One CORE example as token rows (tokens, index of the first scored token): the choices or
    context options of multiple choice and schema, the one row of language modelling."""

    rows: list[tuple[list[int], int]]
    gold: int  # the right choice or context option; -1 for language modelling
    cut: bool  # some row was longer than the block: cut from the left


class CoreTask:
    """CORE as nanochat computes it, from the DCLM eval bundle: a folder with core.yaml (icl_tasks:
    label, dataset_uri, num_fewshot, icl_task_type, continuation_delimiter), eval_meta_data.csv
    (Eval Task, Random baseline) and eval_data/<dataset_uri>. Every file is read and every row
    checked at start-up."""

    def __init__(self, config: CoreConfig, name: str, cache_dir: str):
        self.config, self.name, self.folder = config, name, Path(config.path).expanduser()

    def subtasks(self) -> list[CoreSubtask]:
        spec, baselines = self.folder / "core.yaml", self.folder / "eval_meta_data.csv"
        for f in (spec, baselines):
            if not f.is_file():
                raise UserError(f"eval task {self.name}: no {f.name} in eval.tasks.{self.name}.path={self.config.path} "
                                "(the DCLM eval bundle: core.yaml, eval_meta_data.csv, eval_data/)")
        chance = read_baselines(baselines)
        out = []
        for i, entry in enumerate(read_yaml(spec).get("icl_tasks") or []):
            sub = core_subtask(entry, spec, i, chance, baselines)
            file = self.folder / "eval_data" / entry["dataset_uri"]
            if not file.is_file():
                raise UserError(f"{spec}: task {sub.label}: no file {file}")
            rows = read_rows(file, lambda row, where, kind=sub.kind: core_row(row, kind), CORE_ROWS[sub.kind])
            random.Random(1337).shuffle(rows)  # the reference's order: limit takes the same rows
            sub.rows = rows[: self.config.limit] if self.config.limit else rows
            if sub.num_fewshot >= len(sub.rows):  # the shots are drawn from the other rows kept
                raise UserError(f"eval task {self.name}: {sub.label} shows {sub.num_fewshot} solved examples before "
                                f"each row, drawn from the others of the {len(sub.rows)} kept: set "
                                f"eval.tasks.{self.name}.limit to more than {sub.num_fewshot} (or leave it unset)")
            out.append(sub)
        if not out:
            raise UserError(f"{spec}: no tasks: icl_tasks is an empty or missing list")
        return out

    def render(self, sub: CoreSubtask, tokenizer: Tokenizer, block_size: int) -> list[CoreExample]:
        """Every example of a subtask as token rows: its prompts (few-shot examples drawn as the
        reference draws them, from the other rows kept), each after the end-of-text token and cut
        from the left to the block (as nanochat cuts GPT-2's to its 1024)."""
        bos = tokenizer.eot_token
        if bos is None:
            raise UserError(f"eval task {self.name}: CORE's prompts start with the end-of-text token, which the "
                            "model's vocabulary (characters) lacks")
        out = []
        for idx, item in enumerate(sub.rows):
            shots = []
            if sub.num_fewshot:
                others = [i for i in range(len(sub.rows)) if i != idx]
                shots = [sub.rows[i] for i in random.Random(1234 + idx).sample(others, sub.num_fewshot)]
            tokens = [[bos, *tokenizer.encode(p)] for p in core_prompts(sub.kind, item, shots, sub.delimiter)]
            if sub.kind == "multiple_choice":  # scored from where the choices' tokens part
                starts = [common_length(tokens)] * len(tokens)
            elif sub.kind == "schema":  # scored over the shared continuation: the common suffix
                suffix = common_length([t[::-1] for t in tokens])
                starts = [len(t) - suffix for t in tokens]
            else:  # the continuation after the context's own tokens
                without, tokens = tokens[0], tokens[1:]
                if tokens[0][: len(without)] != without or len(without) >= len(tokens[0]):
                    raise UserError(f"eval task {self.name}: {sub.label} row {idx} (after the shuffle): the context's "
                                    "tokens are not a prefix of the context and continuation's")
                starts = [len(without)]
            rows = [(t[-block_size:], max(s - max(len(t) - block_size, 0), 1)) for t, s in zip(tokens, starts)]
            out.append(CoreExample(rows, item.get("gold", -1), any(len(t) > block_size for t in tokens)))
        return out


def core_prompts(kind: str, item: dict, shots: list[dict], delimiter: str) -> list[str]:
    """The reference's prompts (its jinja templates, written out): each solved shot and a blank
    line, then the example once per choice (multiple choice) or context option (schema); for
    language modelling the context alone (stripped) and the context with its continuation."""
    d = delimiter
    if kind == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{d}{choice}" for choice in item["choices"]]
    if kind == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{option}{d}{item['continuation']}" for option in item["context_options"]]
    head = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    without = f"{head}{item['context'].strip()}{d}"
    return [without.strip(), without + item["continuation"]]


def common_length(rows: list[list[int]]) -> int:
    """How many first tokens all rows share."""
    n = min(map(len, rows))
    return next((i for i in range(n) if any(r[i] != rows[0][i] for r in rows)), n)


def read_yaml(path: Path) -> dict:
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not YAML ({' '.join(str(e).split())})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: not a mapping with an icl_tasks list")
    return spec


def read_baselines(path: Path) -> dict[str, float]:
    """eval_meta_data.csv's random baseline (percent) of each task, by label."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise UserError(f"{path}: no 'Eval Task' and 'Random baseline' columns")
    out = {}
    for n, row in enumerate(rows, start=2):
        try:
            out[row["Eval Task"]] = float(row["Random baseline"])
        except (TypeError, ValueError):
            raise UserError(f"{path}:{n}: Random baseline {row['Random baseline']!r} is not a number") from None
    return out


def core_subtask(entry, spec: Path, i: int, chance: dict[str, float], baselines: Path) -> CoreSubtask:
    """One entry of core.yaml's icl_tasks, checked."""
    where = f"{spec}: icl_tasks[{i}]"
    if not isinstance(entry, dict) or not {"label", "dataset_uri", "num_fewshot", "icl_task_type"} <= set(entry):
        raise UserError(f"{where}: an entry has label, dataset_uri, num_fewshot and icl_task_type")
    label, kind, shots = entry["label"], entry["icl_task_type"], entry["num_fewshot"]
    if not isinstance(entry["dataset_uri"], str):
        raise UserError(f"{where} ({label}): dataset_uri {entry['dataset_uri']!r} is not a path under eval_data/")
    if kind not in CORE_ROWS:
        raise UserError(f"{where} ({label}): icl_task_type {kind!r} is not one of {', '.join(CORE_ROWS)}")
    shots = shots[0] if isinstance(shots, list) and shots else shots  # a list: the first is used
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise UserError(f"{where} ({label}): num_fewshot {entry['num_fewshot']!r} is not a count (or a list of them)")
    if label not in chance:
        raise UserError(f"{baselines}: no row for task {label} (its Random baseline centres the score)")
    return CoreSubtask(label, kind, shots, str(entry.get("continuation_delimiter", " ")), chance[label], [])


def core_row(row, kind: str) -> dict:
    """A row of a CORE task file, checked for its type's keys."""
    if not isinstance(row, dict):
        raise TypeError(f"a JSON {type(row).__name__} where an example belongs")
    texts, options = {"multiple_choice": (["query"], "choices"), "schema": (["continuation"], "context_options"),
                      "language_modeling": (["context", "continuation"], None)}[kind]
    for key in texts:
        _text(row[key], key)
    if options is None:
        if not row["continuation"]:
            raise ValueError("an empty continuation: nothing to score")
        return row
    if not isinstance(row[options], list) or len(row[options]) < 2:
        raise TypeError(f"{options} is not a list of at least two strings")
    for i, option in enumerate(row[options]):
        _text(option, f"{options}[{i}]")
    gold, n = row["gold"], len(row[options])
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < n:
        raise ValueError(f"gold {gold!r} is not one of the {n} {options} (0 to {n - 1})")
    return row


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
