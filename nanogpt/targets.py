"""Code named by `_target_`: importing it, the option its builder receives, and which of it a
command trusts.

Typing. A YAML option without a schema (a user's own, from their config folder) is typed by the
dataclass its builder's first argument is annotated with (`def build_lion(c: LionConfig, ...)`,
`class MyGPT(GPT): def __init__(self, config: MyConfig)`): unknown keys, wrong types and values
out of range are one line at start-up, as for nanogpt's own options. A builder without one gets
an Option: the YAML's keys read as attributes, a key it lacks one line.

Trust follows where a target's text comes from. A command trusts what it names itself: the YAML
files of conf/ and of the config folders it names (--config-dir, hydra.searchpath), its command
line, and the modules listed in `extensions` there. Text a run folder holds is data: a target
in its saved overrides (nanogpt.cli.expand_resume) or a checkpoint's model class
(nanogpt.checkpoint) is imported only when the command trusts its module.
"""

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Callable, Iterable, Iterator

from nanogpt.errors import UserError


def resolve(target: str, key: str) -> Callable:
    """What a `_target_` names, imported; one line when it cannot be."""
    module, _, name = target.rpartition(".")
    if not module or not name:
        raise UserError(f"{key}._target_={target!r} is not a dotted path: package.module.name")
    try:
        found = importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{key}._target_={target}: cannot import module {module} ({e}): install your package "
                        "(pip install -e <folder>) or put its folder on PYTHONPATH") from None
    if not hasattr(found, name):
        raise UserError(f"{key}._target_={target}: module {module} has no {name}")
    return getattr(found, name)


def option_type(builder: Callable) -> type | None:
    """The dataclass a builder's first argument is annotated with (a class's: its __init__'s)."""
    try:
        first = next(iter(inspect.signature(builder).parameters.values()))
    except (StopIteration, TypeError, ValueError):
        return None
    hint = first.annotation
    if isinstance(hint, str):  # `from __future__ import annotations`
        try:
            hint = typing.get_type_hints(builder.__init__ if isinstance(builder, type) else builder).get(first.name)
        except Exception:  # a name its module cannot resolve: no type to read
            return None
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


class MissingKey(UserError, AttributeError):
    """An untyped option read for a key it lacks (an AttributeError too, so hasattr() works)."""


class Option:
    """An untyped option, handed to its builder: the YAML's keys read as attributes (`c.beta1`)
    or as a mapping (`dict(c)`, `**c`)."""

    __slots__ = ("_values", "_key")

    def __init__(self, values: dict, key: str):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_key", key)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # pickle and copy probe for hooks
            raise AttributeError(name)
        values, key = object.__getattribute__(self, "_values"), object.__getattribute__(self, "_key")
        if name not in values:
            raise MissingKey(f"{key}.{name}: read by {values.get('_target_')}, but {key} has no such key "
                             f"(it has {', '.join(k for k in values if k != '_target_') or 'none'})")
        return values[name]

    def __setattr__(self, name, value):
        raise AttributeError("an option is read-only")

    def __getitem__(self, name: str):
        return self.__getattr__(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self):
        return self._values.keys()

    def __eq__(self, other) -> bool:
        return isinstance(other, Option) and self._values == other._values

    def __repr__(self) -> str:
        return f"Option({self._values!r})"

    def __getstate__(self):
        return self._values, self._key

    def __setstate__(self, state):
        object.__setattr__(self, "_values", state[0])
        object.__setattr__(self, "_key", state[1])


def targets_in(value, key: str = "") -> Iterator[tuple[str, str]]:
    """(key, target) of every option with a `_target_` in a config (dataclasses, dicts, Options)."""
    if isinstance(value, Option) or (isinstance(value, dict) and "_target_" in value):
        yield key, value["_target_"]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "_target_"):
            yield key, value._target_
        else:
            for f in dataclasses.fields(value):
                yield from targets_in(getattr(value, f.name), f"{key}{'.' if key else ''}{f.name}")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from targets_in(v, f"{key}{'.' if key else ''}{k}")


def with_options(value, key: str = ""):
    """A converted config with each untyped option (a dict with a `_target_`) as an Option."""
    if isinstance(value, dict):
        if "_target_" in value:
            return Option(value, key)
        return {k: with_options(v, f"{key}{'.' if key else ''}{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and not hasattr(value, "_target_"):
        for f in dataclasses.fields(value):
            setattr(value, f.name, with_options(getattr(value, f.name), f"{key}{'.' if key else ''}{f.name}"))
    return value


def covered(target: str, names: Iterable[str]) -> bool:
    """Whether a target is one of names, or inside a module or package among them."""
    return any(target == n or target.startswith(n + ".") for n in names)


def trusted_names(config) -> tuple[str, ...]:
    """What a command may import for a target read from a file it did not name (a checkpoint's
    model class): the modules of its own config's targets, and its `extensions`."""
    own = (target.rpartition(".")[0] for _, target in targets_in(config))
    return tuple(dict.fromkeys([*own, *getattr(config, "extensions", [])]))


class NotTrusted(UserError):
    """A file names code the current command does not trust (a checkpoint's model class)."""

    def __init__(self, target: str, where: str):
        self.target, self.package = target, target.split(".")[0]
        super().__init__(f"{where} names {target}: a run folder cannot make a command import code; if it is yours, "
                         f"add extensions=[{self.package}] to the command")


def override_targets(override: str) -> list[str]:
    """The targets a Hydra override names: in its key (`optim._target_=pkg.f`) or inside a dict
    value (`+logger.x={_target_: pkg.f}`). ValueError when it holds `_target_` text otherwise
    (a sweep, a quoted string...): what cannot be read is not trusted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_override(override)
        value = parsed.value()
    except HydraException as e:
        raise ValueError(str(e)) from None
    found = [str(value)] if parsed.key_or_group.endswith("_target_") else []

    def walk(v) -> None:
        if isinstance(v, dict):
            found.extend(str(t) for k, t in v.items() if k == "_target_")
            for item in v.values():
                walk(item)
        elif isinstance(v, list):
            for item in v:
                walk(item)

    walk(value)
    if "_target_" in override and not found:
        raise ValueError(f"cannot tell what {override!r} names")
    return found
