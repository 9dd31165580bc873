"""Where text comes from: the pieces of text data.source or data.hf_dataset holds, in a fixed
order, each marked train or val, from any saved position on.

Text files are read in chunks that end at a line break; each file is one document, and the last
val_fraction of all text files' characters is the val split (one file, such as Tiny Shakespeare,
splits as nanoGPT splits it). Rows of jsonl (plain or gzip) and parquet files and of Hugging Face
datasets are documents; every (1/val_fraction)-th row is val, so the split does not depend on
how much is read. Local row files are read here (jsonl line by line, parquet by pyarrow), so a
position is a file and a line or row, and every complaint names them; a Hub dataset is read as a
stream through `datasets`.

A row whose line is not JSON, or whose text is missing or not a string, is a bad row:
data.bad_rows=stop ends the preparation naming it, skip leaves it out and counts it (the rows
counted for the split are the good ones, so skipping gives what the file without those lines
gives). A file that cannot be read to its end (truncated gzip or parquet) always stops it.
"""

import hashlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nanogpt import jsonl
from nanogpt.config import DataConfig
from nanogpt.errors import UserError

CHUNK_CHARS = 1 << 16
ROW_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json"}
SHOWN_BAD_ROWS = 10  # data.bad_rows=skip names the first few in the log, then only counts them
PARQUET_BATCH = 1024  # rows decoded at a time
# formats that are not text, by their first bytes
BINARY_MAGIC = {b"PAR1": "a parquet file", b"\x1f\x8b": "gzip-compressed", b"PK\x03\x04": "a zip archive"}

log = logging.getLogger("nanogpt")


@dataclass
class Piece:
    text: str
    split: str  # train | val
    document: bool  # the first piece of a document


def row_format(path: Path) -> str | None:
    """datasets' builder for a file of rows (parquet, json), or None for text."""
    return next((fmt for suffix, fmt in ROW_FORMATS.items() if path.name.endswith(suffix)), None)


def source_files(sources: list[str]) -> list[Path]:
    """The files data.source names (folders: every file below, in order); a file that is neither
    rows nor text is refused, never read as characters."""
    if not sources:
        raise UserError("data.source is empty: name files or folders, e.g. data.source=[notes/,book.txt,web.jsonl.gz]")
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
        kind = None if row_format(f) else not_text(f)
        if kind:
            raise UserError(f"data.source: {f} is {kind}, not text: name text, .jsonl(.gz) or .parquet files")
    return files


def not_text(path: Path) -> str | None:
    """What a file is when it is not text, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(8192)
    kind = next((k for magic, k in BINARY_MAGIC.items() if head.startswith(magic)), None)
    return kind or ("binary (it holds NUL bytes)" if b"\0" in head else None)


def groups(data: DataConfig) -> list[tuple[str, list[Path]]]:
    """The sources as runs of files of one format: ("text", files), ("json", files),
    ("parquet", files), ...; a Hub dataset is one ("hub", []) group."""
    if data.hf_dataset:
        return [("hub", [])]
    runs: list[tuple[str, list[Path]]] = []
    for f in source_files(data.source):
        fmt = row_format(f) or "text"
        if runs and runs[-1][0] == fmt:
            runs[-1][1].append(f)
        else:
            runs.append((fmt, [f]))
    return runs


def text_chars(data: DataConfig) -> int:
    """How many characters the text files hold (they split by characters)."""
    return sum(len(chunk) for fmt, files in groups(data) if fmt == "text" for f in files for chunk in _chunks(f))


def _chunks(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        while chunk := f.read(CHUNK_CHARS):
            yield chunk + f.readline(CHUNK_CHARS)


class Source:
    """The pieces of the data, from a position on; position() is where the pieces yielded so far
    end, a JSON-able record a later Source continues from: the group and file, and in it the
    offset (text, jsonl: the next line's byte, decompressed; `sha256` of the bytes before it) or
    row (parquet), or the `datasets` stream's state (Hub); the characters and rows read, and the
    bad rows skipped."""

    def __init__(self, data: DataConfig, n_text_chars: int, log_skipped: bool = True):
        self.data, self.groups, self.log_skipped = data, groups(data), log_skipped
        self.n_train_chars = int(n_text_chars * (1 - data.val_fraction))
        self._pos = {"group": 0, "file": 0, "offset": 0, "line": 0, "sha256": None, "row": 0, "chars": 0, "rows": 0,
                     "bad_rows": 0, "stream": None}
        self._file = self._digest = self._dataset = None

    def position(self) -> dict:
        pos = dict(self._pos)
        if self._file is not None:
            pos["offset"] = self._file.tell()
        if self._digest is not None:
            pos["sha256"] = self._digest.hexdigest()
        if self._dataset is not None:
            pos["stream"] = self._dataset.state_dict()
        return pos

    def pieces(self, position: dict | None = None) -> Iterator[Piece]:
        self._pos |= position or {}
        for g in range(self._pos["group"], len(self.groups)):
            fmt, files = self.groups[g]
            self._pos["group"] = g
            read = {"text": self._text, "json": self._json, "parquet": self._parquet, "hub": self._hub}[fmt]
            yield from read(files)
            self._pos.update(group=g + 1, file=0, offset=0, line=0, sha256=None, row=0, stream=None)

    def _text(self, files: list[Path]) -> Iterator[Piece]:
        pos = self._pos
        for i in range(pos["file"], len(files)):
            pos["file"] = i
            with open(files[i], encoding="utf-8", errors="replace", newline="") as f:
                self._file = f
                f.seek(pos["offset"])
                first = pos["offset"] == 0
                while True:
                    to_split = self.n_train_chars - pos["chars"]
                    # a chunk ends at a line break, or exactly where train ends and val begins
                    chunk = f.read(min(CHUNK_CHARS, to_split) if to_split > 0 else CHUNK_CHARS)
                    if not chunk:
                        break
                    if not 0 < to_split <= CHUNK_CHARS:
                        chunk += f.readline(CHUNK_CHARS)
                    pos["chars"] += len(chunk)
                    yield Piece(chunk, "train" if to_split > 0 else "val", first)
                    first = False
            self._file = None
            pos.update(file=i + 1, offset=0)

    def _row(self, text, where: str, why_not: str | None = None) -> Iterator[Piece]:
        """A row's piece, or, for a bad row, data.bad_rows' answer: stop naming it, or count it."""
        if why_not is None and not isinstance(text, str):
            why_not = f"{self.data.text_column!r} is {'null' if text is None else type(text).__name__}, not a string"
        if why_not is not None:
            self._bad(where, why_not)
            return
        i = self._pos["rows"]
        self._pos["rows"] += 1
        # row i is val when the count of val rows, i*f rounded down, steps up at it
        f = self.data.val_fraction
        yield Piece(text, "val" if int((i + 1) * f) > int(i * f) else "train", True)

    def _bad(self, where: str, why: str) -> None:
        if self.data.bad_rows == "stop":
            raise UserError(f"{where}: {why}: correct it and run the same command again, or set data.bad_rows=skip "
                            "to leave such rows out")
        self._pos["bad_rows"] += 1
        if self.log_skipped and self._pos["bad_rows"] <= SHOWN_BAD_ROWS:
            more = "; further ones are counted, not shown" if self._pos["bad_rows"] == SHOWN_BAD_ROWS else ""
            log.warning(f"skipped {where}: {why} (data.bad_rows=skip{more})")

    def _json(self, files: list[Path]) -> Iterator[Piece]:
        pos, column = self._pos, self.data.text_column
        for i in range(pos["file"], len(files)):
            pos["file"] = i
            with jsonl.open_bytes(files[i]) as f:
                # a saved position goes on only from the very bytes it was taken after
                self._digest, got = hashed_prefix(f, pos["offset"])
                if pos["offset"] and (got, self._digest.hexdigest()) != (pos["offset"], pos["sha256"]):
                    raise UserError(f"{files[i]} changed while it was being prepared: run again (it restarts)")
                good = missing = 0
                whole = pos["offset"] == 0
                for line in jsonl.lines(files[i], f, pos["offset"], pos["line"], self._digest):
                    pos.update(offset=line.end, line=line.number)
                    why = line.error and line.error + _array_hint(line.number)
                    if why is None and column not in line.row:
                        why = f"no {column!r} key (it has {', '.join(line.row) or 'none'}; data.text_column names the key)"
                        missing += 1
                    yield from self._row(None if why else line.row[column], f"{files[i]}:{line.number}", why)
                    good += why is None and isinstance(line.row[column], str)
                if whole and missing and not good:  # data.bad_rows=skip, and no row has the key: the setting is wrong
                    raise UserError(f"no row of {files[i]} has a {column!r} key: set data.text_column to the key "
                                    "that holds the text")
            self._digest = None
            pos.update(file=i + 1, offset=0, line=0, sha256=None)

    def _parquet(self, files: list[Path]) -> Iterator[Piece]:
        pos, column = self._pos, self.data.text_column
        for i in range(pos["file"], len(files)):
            pos["file"] = i
            for n, text in parquet_column(files[i], column, pos["row"]):
                pos["row"] = n
                yield from self._row(text, f"{files[i]}: row {n:,}")
            pos.update(file=i + 1, row=0)

    def _hub(self, files: list[Path]) -> Iterator[Piece]:
        pos, column, name = self._pos, self.data.text_column, self.data.hf_dataset
        self._dataset = stream(self.data)
        if pos["stream"] is not None:
            self._dataset.load_state_dict(pos["stream"])
        with named_failures(name):
            for row in self._dataset:
                if column not in row:
                    raise UserError(f"data.text_column={column!r} is not a column of {name} (it has {', '.join(row)})")
                pos["row"] += 1
                yield from self._row(row[column], f"{name}: row {pos['row']:,}")
        self._dataset = None


def _array_hint(number: int) -> str:
    return " (a JSON array? a source holds JSON lines, one object a line: jq -c '.[]' converts)" if number == 1 else ""


def hashed_prefix(f, n: int):
    """A SHA-256 of f's next n bytes (fewer at its end), read; and how many there were."""
    digest, left = hashlib.sha256(), n
    while left and (block := f.read(min(left, 1 << 20))):
        digest.update(block)
        left -= len(block)
    return digest, n - left


def prefix_sha256(path: Path, n: int) -> str | None:
    """SHA-256 of a file's first n bytes (decompressed); None when it has fewer or cannot be read."""
    try:
        with jsonl.open_bytes(path) as f:
            digest, got = hashed_prefix(f, n)
    except (OSError, EOFError):
        return None
    return digest.hexdigest() if got == n else None


def parquet_column(path: Path, column: str, skip: int = 0) -> Iterator[tuple[int, object]]:
    """(row number, value) of one column of a parquet file, from row skip + 1 on."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading parquet files needs pyarrow: pip install -e '.[data]'") from None
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid for a truncated file: its footer is gone
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__}: {e}); copy it again") from None
    if column not in f.schema_arrow.names:
        raise UserError(f"data.text_column={column!r} is not a column of {path} (it has {', '.join(f.schema_arrow.names)})")
    # start at the row group that holds row skip + 1
    group, first = 0, 0
    while group < f.num_row_groups and first + f.metadata.row_group(group).num_rows <= skip:
        first += f.metadata.row_group(group).num_rows
        group += 1
    n = first
    try:
        for batch in f.iter_batches(PARQUET_BATCH, row_groups=range(group, f.num_row_groups), columns=[column]):
            for value in batch.column(0).to_pylist():
                n += 1
                if n > skip:
                    yield n, value
    except Exception as e:  # a damaged page or row group
        raise UserError(f"{path}: unreadable after row {n:,} ({type(e).__name__}: {e}); copy it again") from None


@contextmanager
def named_failures(dataset: str):
    """A read of a Hub dataset that fails becomes one line naming the file: `datasets` logs the
    file it failed on, then raises pyarrow's error without it. The log record is taken (not
    printed); a local JSON lines file is read again to find the line."""
    handler, logger = _LastFile(), logging.getLogger("datasets")
    saved = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        file = Path(handler.file) if handler.file else None
        bad = first_bad_line(file) if file and file.is_file() and row_format(file) == "json" else None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(bad or f"{file or dataset}: cannot be read ({type(e).__name__}: {reason})") from None
    finally:
        logger.handlers, logger.propagate = saved


class _LastFile(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.file = None

    def emit(self, record):
        found = re.search(r"file '([^']+)'", record.getMessage())
        self.file = found.group(1) if found else self.file


def first_bad_line(path: Path) -> str | None:
    """`<file>:<line>: why` for a local JSON lines file's first line that is not an object."""
    for line in jsonl.lines(path):
        if line.row is None:
            return f"{path}:{line.number}: {line.error}"
    return None


def stream(data: DataConfig):
    """A Hub dataset (or a local folder laid out like one) as a streamed datasets.IterableDataset."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError("reading Hugging Face datasets needs datasets: pip install -e '.[data]'") from None
    try:
        ds = load_dataset(data.hf_dataset, name=data.hf_name, data_files=data.data_files or None,
                          revision=data.hf_revision, split="train", streaming=True)
    except Exception as e:
        raise UserError(f"could not read {data.hf_dataset} ({type(e).__name__}: {e}); a Hub dataset's first read needs "
                        "the network") from None
    # decode only the text (FineWeb's rows carry a dozen other columns)
    return ds.select_columns([data.text_column]) if ds.features and data.text_column in ds.features else ds
