"""Valid values as data. Each schema field carries its range next to its type,

    n_layer: int = valid(12, POSITIVE)
    activation: str = valid("gelu", OneOf("gelu", "gelu_tanh", "relu2"))

and a schema's rules that join several keys sit beside its fields in a RULES table. check()
walks a config once, before any work, and names the first wrong key with its value and what is
allowed, in one line. Plain dataclasses: the model's config uses this without knowing Hydra.
"""

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanogpt.errors import UserError


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False
    name: str = ""  # how a message says it ("positive"); else the interval

    def allows(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            return False
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return self.high is None or (v < self.high or (not self.high_open and v == self.high))

    def outside(self):
        """A value this range refuses (for tests)."""
        return self.low - 1 if self.low is not None else self.high + 1

    def __str__(self) -> str:
        if self.name:
            return self.name
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class OneOf:
    choices: tuple

    def __init__(self, *choices):
        object.__setattr__(self, "choices", choices)

    def allows(self, v) -> bool:
        return v in self.choices

    def outside(self):
        return "nope"

    def __str__(self) -> str:
        return "one of " + ", ".join(map(str, self.choices))


@dataclass(frozen=True)
class Matches:
    """A string matching pattern; for a list, every entry."""

    pattern: str
    description: str
    refused: str = "nope"  # a value the pattern refuses (for tests)

    def allows(self, v) -> bool:
        return all(isinstance(s, str) and re.fullmatch(self.pattern, s) for s in (v if isinstance(v, (list, tuple)) else [v]))

    def outside(self):
        return self.refused

    def __str__(self) -> str:
        return self.description


@dataclass(frozen=True)
class Exists:
    """A path that must exist (file=True: a file, not a folder); for a list, every entry. prefix:
    only values starting with it name a path (sample.py's start=FILE:prompt.txt). An empty path
    names nothing (it is not the current folder)."""

    prefix: str = ""
    file: bool = False

    def problem(self, v) -> str | None:
        """What is wrong with the first bad path of v."""
        paths = [p[len(self.prefix):] for p in (v if isinstance(v, (list, tuple)) else [v]) if p.startswith(self.prefix)]
        for p in paths:
            path = Path(p).expanduser()
            if not p:
                return "an empty path names nothing"
            if not path.exists():
                return f"{p} does not exist"
            if self.file and not path.is_file():
                return f"{p} is not a file"
        return None

    def allows(self, v) -> bool:
        return self.problem(v) is None

    def outside(self):
        return f"{self.prefix}/no/such/file"

    def __str__(self) -> str:
        return f"an existing {'file' if self.file else 'path'}{f' after {self.prefix}' if self.prefix else ''}"

    def explain(self, key: str, value) -> str:
        return f"{key}: {self.problem(value)}"


@dataclass(frozen=True)
class NotEmpty:
    """Strings that mean something: a list's entries (or a string) none of them empty."""

    def allows(self, v) -> bool:
        return all(isinstance(s, str) and s for s in (v if isinstance(v, (list, tuple)) else [v]))

    def outside(self):
        return [""]

    def __str__(self) -> str:
        return "strings, none of them empty"


POSITIVE = Range(0, low_open=True, name="positive")
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1, high_open=True)  # dropout, betas: 1 would never learn or never forget
FRACTION = Range(0, 1, low_open=True, high_open=True)

Rule = tuple[str, Callable[[Any], bool]]  # (what must hold, in the config's own key names; the test)


def valid(default=dataclasses.MISSING, check=None, *, default_factory=dataclasses.MISSING) -> Any:
    """A dataclass field with its valid values; None (an unset optional) is always allowed."""
    return field(default=default, default_factory=default_factory, metadata={"valid": check})


def check(config, prefix: str = "") -> None:
    """Raise UserError for the first key outside its range, then for the first broken rule."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        rule = f.metadata.get("valid")
        if rule is not None and value is not None and not rule.allows(value):
            explain = getattr(rule, "explain", None)
            key = f"{prefix}{f.name}"
            raise UserError(explain(key, value) if explain else f"{key}={_show(value)} must be {rule}")
        for key, child in _children(value, f"{prefix}{f.name}."):
            check(child, key)
    for what, holds in getattr(config, "RULES", ()):
        if not holds(config):
            raise UserError(what.format(c=config, prefix=prefix))  # what names keys as {prefix}n_embd


def _children(value, prefix: str):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield prefix, value
    elif isinstance(value, dict):
        yield from ((f"{prefix}{k}.", v) for k, v in value.items() if dataclasses.is_dataclass(v))


def _show(value) -> str:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)
