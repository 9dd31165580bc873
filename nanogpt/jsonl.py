"""JSON lines files, plain or gzip-compressed, read line by line: every row is known by its file
and line number, so any error about it names both (`notes.jsonl:200: ...`).

lines() yields every non-blank line, parsed or with the reason it is not a JSON object; callers
choose whether a bad line stops them (task files, data.bad_rows=stop) or is counted and skipped
(data.bad_rows=skip). rows() is the strict form. A file that cannot be read to its end (a
truncated or corrupt gzip stream) is always an error: its lost lines cannot be counted.
"""

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from nanogpt.errors import UserError


@dataclass
class Line:
    number: int  # 1-based, blank lines counted
    end: int  # offset of the next line, in the file's (decompressed) bytes
    row: dict | None  # the line's object; None when it is not one
    error: str | None = None  # why it is not (a one-line reason)


def open_bytes(path: Path) -> BinaryIO:
    """The file's bytes: decompressed for a .gz name."""
    return gzip.open(path, "rb") if Path(path).name.endswith(".gz") else open(path, "rb")


def lines(path: Path, f: BinaryIO | None = None, offset: int = 0, number: int = 0, digest=None) -> Iterator[Line]:
    """The lines of path from the line after `number`, which starts at `offset` (f: the file
    already open there); blank lines are left out. digest (a hashlib object) is fed every byte read."""
    own = f is None
    f = f or open_bytes(path)
    try:
        while True:
            try:
                raw = f.readline()
            except (EOFError, OSError, zlib.error) as e:  # gzip's errors for a truncated or damaged stream
                raise UserError(f"{path}: unreadable after line {number:,} ({type(e).__name__}: {e}): "
                                "the file is truncated or damaged; compress or copy it again") from None
            if not raw:
                return
            if digest is not None:
                digest.update(raw)
            number += 1
            offset += len(raw)
            if raw.strip():
                yield parse(raw, number, offset)
    finally:
        if own:
            f.close()


def parse(raw: bytes, number: int, end: int) -> Line:
    try:
        row = json.loads(raw.rstrip(b"\r\n"))
    except UnicodeDecodeError as e:
        return Line(number, end, None, f"not UTF-8 ({e.reason} at byte {e.start})")
    except json.JSONDecodeError as e:
        return Line(number, end, None, f"not JSON ({e.msg}: column {e.colno})")
    if not isinstance(row, dict):
        return Line(number, end, None, f"a JSON {type(row).__name__}, not an object")
    return Line(number, end, row)


def rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every line; the first line that is not a JSON object stops with
    one line naming the file and the line."""
    for line in lines(path):
        if line.row is None:
            raise UserError(f"{path}:{line.number}: {line.error}")
        yield line.number, line.row
