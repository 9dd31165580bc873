"""What a prepared data folder was made from, and whether it still holds that.

meta.json, written last, marks a finished folder and records what it was made from (each source's
path, size, modification time and SHA-256, or the dataset's name, configuration, revision and
files; the tokenizer; the split; the budget; data.bad_rows). Every start compares that record
with the run's settings (stale) and checks the folder is whole (damaged): a folder is never
silently used for other data or read broken, nor prepared again in place unless
data.reprepare=true says so (older runs and other jobs of a sweep may be reading it).
progress.json holds an unfinished preparation; cannot_continue says whether it may go on.
"""

import hashlib
import json
import os
from pathlib import Path

from nanogpt.config import DataConfig
from nanogpt.errors import UserError
from nanogpt.shards import shard_problem
from nanogpt.sources import groups, prefix_sha256, source_files

LAYOUT = 2  # 1: one train.bin and val.bin, before shards
PROGRESS = 2  # a saved position's form; 1 (none recorded): row files were read through datasets
LATER_KEYS = {"bad_rows": "stop"}  # settings the record gained later: what older folders were made with
REPREPARE = "set data.reprepare=true to prepare it again"


def write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """A JSON object from a file; None when there is none or it does not parse."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def settings(data: DataConfig) -> dict:
    """The settings a prepared folder depends on, besides its source files."""
    keys = ["tokenizer", "val_fraction", "max_tokens", "shard_tokens", "text_column", "bad_rows"]
    keys += ["bpe_vocab_size", "bpe_train_chars"] if data.tokenizer == "bpe" else []
    keys += ["hf_dataset", "hf_name", "hf_revision", "data_files"] if data.hf_dataset else []
    return {k: list(v) if k == "data_files" else v for k in keys for v in [getattr(data, k)]}


def made_from(data: DataConfig) -> dict:
    """What a folder prepared with these settings is made from."""
    if data.hf_dataset:
        return settings(data)
    sources = [{"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns, "sha256": sha256(f)}
               for f in source_files(data.source)]
    return settings(data) | {"sources": sources}


def recorded(record: dict, key: str):
    return record.get(key, LATER_KEYS.get(key))


def changed_setting(record: dict, now: dict, bad_rows: int) -> str | None:
    """The first setting of now that record differs in, the budget aside; data.bad_rows only when
    rows were left out (while none were, stop and skip have read the same)."""
    for key, value in now.items():
        if key in ("max_tokens", "sources") or (key == "bad_rows" and not bad_rows):
            continue
        if recorded(record, key) != value:
            return f"data.{key} was {recorded(record, key)!r}, now {value!r}"
    return None


def stale(meta: dict, data: DataConfig) -> str | None:
    """Why a prepared folder does not hold what these settings would make ("extend": only the
    budget grew), or None. A source counts as the same when its path, size and modification time
    are, or its contents."""
    if meta.get("layout") != LAYOUT:
        return "was prepared by an older version, as one train.bin"
    record = meta["made_from"]
    why = changed_setting(record, settings(data), meta.get("bad_rows", 0))
    if why is None and not data.hf_dataset:
        why = changed_sources(record.get("sources", []), source_files(data.source))
    if why:
        return f"was prepared from other data ({why})"
    then, now, total = record["max_tokens"], data.max_tokens, meta["train_tokens"] + meta["val_tokens"]
    if then == now or (meta["exhausted"] and (now is None or now >= total)):
        return None
    if now is None or (then is not None and now > then):
        return "extend" if readable(meta["progress"], data) else "was prepared by an older version, which cannot extend it"
    return f"was prepared from other data (data.max_tokens was {then}, now {now})"


def changed_sources(sources: list[dict], files: list[Path]) -> str | None:
    if len(files) != len(sources):
        return f"{len(sources)} source files then, {len(files)} now"
    for f, then in zip(files, sources):
        now = f.stat()
        same_file = (str(f.resolve()), now.st_mtime_ns) == (then["path"], then["mtime_ns"])
        if now.st_size != then["size"] or not (same_file or sha256(f) == then["sha256"]):
            return f"{f} is not the {then['path']} it was prepared from"
    return None


def readable(progress: dict, data: DataConfig) -> bool:
    """Whether this version reads a saved position: any but one inside row files, which an older
    version (no `version` recorded) read through datasets."""
    position = progress.get("position")
    if progress.get("version") == PROGRESS or not position:
        return True
    runs = groups(data)
    return position["group"] < len(runs) and runs[position["group"]][0] in ("text", "hub")


def cannot_continue(state: dict, now: dict, data: DataConfig) -> str | None:
    """Why the preparation saved in progress.json (state) cannot go on with the settings and
    sources `now` records; None when it can. Its settings must be the same, the budget aside, and
    so must every byte it has read: files read whole, and of the file it stopped in, the part
    before its position (a file corrected below a bad row it stopped at continues; the SHA-256
    of that part, saved with the position, shows it is unchanged). A text file (it sets where
    val begins) or any source of a learnt vocabulary must be unchanged."""
    then, pos = state.get("made_from") or {}, state.get("position") or {}
    if "batches" not in state or not readable(state, data):
        return "it was saved by an older version"
    why = changed_setting(then, now, pos.get("bad_rows", 0))
    if why:
        return why
    old, new = then.get("sources", []), now.get("sources", [])
    if len(old) != len(new):
        return f"{len(old)} source files then, {len(new)} now"
    runs = groups(data) if new else []
    files = [(fmt, f) for fmt, fs in runs for f in fs]
    at = sum(len(fs) for _, fs in runs[: pos.get("group", 0)]) + pos.get("file", 0) if pos else -1
    for k, ((fmt, f), o, n) in enumerate(zip(files, old, new)):
        if o["sha256"] == n["sha256"]:
            continue
        if data.tokenizer in ("char", "bpe"):
            return f"{f} changed, and the vocabulary was learnt from the sources"
        if fmt == "text":
            return f"{f} changed, and text files set where the val split begins"
        if k < at or (k == at and fmt != "json" and pos.get("row")):
            return f"{f} changed in the part already read"
        if k == at and fmt == "json" and pos["offset"] and prefix_sha256(f, pos["offset"]) != pos["sha256"]:
            return f"{f} changed in its first {pos['line']:,} lines, which were read already"
    return None


def damaged(out: Path) -> str | None:
    """Why a finished folder cannot be read as its meta.json says: it does not parse, or a shard
    it lists is missing or not the size its header says."""
    try:
        meta = parse_meta((out / "meta.json").read_text())
        shards = [f for s in meta["splits"].values() for f in s["shards"]] if meta.get("layout") == LAYOUT else []
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"is damaged: its meta.json does not parse ({type(e).__name__}: {e})"
    why = next((w for f in shards if (w := shard_problem(out / f))), None)
    return why and f"is damaged: {why}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_meta(path: Path) -> dict:
    """A data folder's meta.json (JSON, never pickle: opening a folder runs no code)."""
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise UserError(f"no prepared data in {path}: run python -m nanogpt.prepare data=<name> (or just train)")
    try:
        return parse_meta(meta_file.read_text())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{meta_file} does not parse ({type(e).__name__}: {e}): {REPREPARE}") from None


def parse_meta(text: str) -> dict:
    meta = json.loads(text)
    meta["vocab_size"], meta["dtype"] = int(meta["vocab_size"]), str(meta["dtype"])
    return meta
