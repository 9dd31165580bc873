"""Where text comes from: the pieces of text data.source or data.hf_dataset holds, in a fixed
order, each marked train or val, from any saved position on.

Text files are read in chunks that end at a line break; each file is one document, and the last
val_fraction of all text files' characters is the val split (one file, such as Tiny Shakespeare,
splits as nanoGPT splits it). Rows of jsonl (plain or gzip), parquet and Hugging Face datasets are
documents, read as a stream through `datasets` (a Hub dataset and local files take the same path);
every (1/val_fraction)-th row is val, so the split does not depend on how much is read.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nanogpt.config import DataConfig
from nanogpt.errors import UserError

CHUNK_CHARS = 1 << 16
ROW_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json"}
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
    """The sources as runs of files of one format: ("text", files), ("parquet", files), ...;
    a Hub dataset is one ("hub", []) group."""
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
    end, a JSON-able record a later Source continues from."""

    def __init__(self, data: DataConfig, n_text_chars: int):
        self.data, self.groups = data, groups(data)
        self.n_train_chars = int(n_text_chars * (1 - data.val_fraction))
        self._pos = {"group": 0, "file": 0, "offset": 0, "chars": 0, "rows": 0, "stream": None}
        self._file = self._dataset = None

    def position(self) -> dict:
        pos = dict(self._pos)
        if self._file is not None:
            pos["offset"] = self._file.tell()
        if self._dataset is not None:
            pos["stream"] = self._dataset.state_dict()
        return pos

    def pieces(self, position: dict | None = None) -> Iterator[Piece]:
        self._pos = dict(position or self._pos)
        for g in range(self._pos["group"], len(self.groups)):
            fmt, files = self.groups[g]
            self._pos["group"] = g
            yield from self._text(files) if fmt == "text" else self._rows(fmt, files)
            self._pos.update(group=g + 1, file=0, offset=0, stream=None)

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

    def _rows(self, fmt: str, files: list[Path]) -> Iterator[Piece]:
        pos, column, f = self._pos, self.data.text_column, self.data.val_fraction
        self._dataset = stream(self.data, fmt, files)
        if pos["stream"] is not None:
            self._dataset.load_state_dict(pos["stream"])
        for row in self._dataset:
            if column not in row:
                where = self.data.hf_dataset if fmt == "hub" else files[0]
                raise UserError(f"data.text_column={column!r} is not a column of {where} (it has {', '.join(row)})")
            i = pos["rows"]
            pos["rows"] += 1
            # row i is val when the count of val rows, i*f rounded down, steps up at it
            yield Piece(row[column] or "", "val" if int((i + 1) * f) > int(i * f) else "train", True)
        self._dataset = None


def stream(data: DataConfig, fmt: str, files: list[Path]):
    """A streamed datasets.IterableDataset of a Hub dataset or of local row files."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError("reading datasets, jsonl and parquet needs Hugging Face datasets: pip install -e '.[data]'") from None
    try:
        if fmt == "hub":
            ds = load_dataset(data.hf_dataset, name=data.hf_name, data_files=data.data_files or None,
                              revision=data.hf_revision, split="train", streaming=True)
        else:
            ds = load_dataset(fmt, data_files=[str(f) for f in files], split="train", streaming=True)
    except Exception as e:
        what = data.hf_dataset if fmt == "hub" else f"{files[0]} ({fmt})"
        raise UserError(f"could not read {what} ({type(e).__name__}: {e}); a Hub dataset's first read needs the network") from None
    # decode only the text (FineWeb's rows carry a dozen other columns)
    return ds.select_columns([data.text_column]) if ds.features and data.text_column in ds.features else ds
