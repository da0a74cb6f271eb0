"""Settings as declarations: every field of a settings dataclass is one CLI flag (`--batch-size`)
and one environment variable (`SPLITFED_BATCH_SIZE`), with its help, choices and bounds kept
beside the field. The CLI, `splitfed serve`, the launcher that starts roles as processes, and the
README's option table are all derived from these dataclasses, so they cannot disagree.

Torch-free: the CLI and the torch-free roles import it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

ENV_PREFIX = "SPLITFED_"


NAME = r"[A-Za-z0-9_.-]{1,64}"  # what may name a session or a party: it becomes part of queue names


def setting(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple[str, ...] | None = None,  # noqa: A002
            min: float | None = None, max: float | None = None, metavar: str | None = None, pattern: str | None = None) -> Any:  # noqa: A002
    """A settings field: its default, its help text, and what values it accepts (`pattern`: a
    regular expression a text value must match whole)."""
    metadata = {"help": help, "choices": choices, "min": min, "max": max, "metavar": metavar, "pattern": pattern}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Option:
    """One settings field as the outside world sees it."""

    name: str  # the dataclass field: batch_size
    type: type  # int, float, str, bool or Path (None allowed where `optional`)
    optional: bool
    default: Any  # dataclasses.MISSING: required
    help: str
    choices: tuple[str, ...] | None
    min: float | None
    max: float | None
    metavar: str | None
    pattern: str | None
    owner: type  # the dataclass that declares it

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return env_name(self.name)

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def parse(self, text: str) -> Any:
        """A value from its text form (a flag or an environment variable), checked."""
        if self.optional and text == "":
            return None
        if self.type is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{self.flag} {text[:80]!r}: not true or false")
            return lowered in ("true", "1", "yes")
        try:
            value = self.type(text)
        except (ValueError, OverflowError):
            raise ValueError(f"{self.flag} {text[:80]!r}: not {TYPE_NAMES[self.type]}") from None
        self.check(value)
        return value

    @property
    def kind(self) -> str:
        """What the value is, for help: its choices, or its type and bounds."""
        if self.choices:
            return "|".join(self.choices)
        bounds = [f">={self.min:g}" if self.min is not None else "", f"<={self.max:g}" if self.max is not None else ""]
        return self.type.__name__.upper().replace("STR", "TEXT") + "".join(bounds)

    def check(self, value: Any) -> None:
        if value is None:
            if not self.optional:
                raise ValueError(f"{self.flag} needs a value")
            return
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.flag} {value!r}: choose one of {', '.join(self.choices)}")
        if self.pattern and not re.fullmatch(self.pattern, str(value)):
            raise ValueError(f"{self.flag} {str(value)[:80]!r}: must match {self.pattern}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.flag} {value!r}: not a finite number")
        if self.min is not None and value < self.min:
            raise ValueError(f"{self.flag} {value!r}: must be at least {self.min:g}")
        if self.max is not None and value > self.max:
            raise ValueError(f"{self.flag} {value!r}: must be at most {self.max:g}")

    def text(self, value: Any) -> str:
        """The inverse of `parse`: how a value travels in an environment variable."""
        return str(value).lower() if isinstance(value, bool) else str(value)


TYPE_NAMES = {int: "a whole number", float: "a number", str: "text", Path: "a path", bool: "true or false"}


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _unwrap(annotation: Any) -> tuple[type, bool]:
    """(base type, optional) of `int`, `int | None`, `Optional[Path]`..."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"settings fields take one type, not {annotation}")
        return args[0], True
    return annotation, False


def options(*classes: type) -> list[Option]:
    """The options of one or more settings dataclasses, in declaration order; a field declared
    by two of them is one option (the later class's declaration wins, as in a subclass)."""
    found: dict[str, Option] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if not field.init:
                continue
            base, optional = _unwrap(hints[field.name])
            if base not in (int, float, str, bool, Path):
                raise TypeError(f"{cls.__name__}.{field.name}: unsupported settings type {base}")
            meta = field.metadata
            found[field.name] = Option(
                field.name, base, optional, field.default, meta.get("help", ""), meta.get("choices"), meta.get("min"),
                meta.get("max"), meta.get("metavar"), meta.get("pattern"), cls,
            )
    return list(found.values())


def build(cls: type, values: dict[str, Any]) -> Any:
    """An instance of settings class `cls` from a dict that may hold other classes' fields too;
    every value is checked against its declaration."""
    mine = {}
    for option in options(cls):
        if option.name in values:
            option.check(values[option.name])
            mine[option.name] = values[option.name]
        elif option.required:
            raise ValueError(f"{option.flag} (or {option.env}) is required")
    return cls(**mine)


def to_env(*instances: Any) -> dict[str, str]:
    """Settings as the SPLITFED_* variables `splitfed serve` reads (None: left unset)."""
    return {name: text for instance in instances for name, text in env_of(type(instance), instance).items()}


def env_of(cls: type, instance: Any) -> dict[str, str]:
    """The SPLITFED_* variables of the fields `cls` declares, taken from `instance`, a `cls` or
    a subclass of it (a run's settings passed on as the connection its roles share)."""
    values = [(option, getattr(instance, option.name)) for option in options(cls)]
    return {option.env: option.text(value) for option, value in values if value is not None}


def values_of(*instances: Any) -> dict[str, Any]:
    """Every field of the given settings, for a results file (paths as text)."""
    out: dict[str, Any] = {}
    for instance in instances:
        for field in dataclasses.fields(instance):
            value = getattr(instance, field.name)
            out[field.name] = str(value) if isinstance(value, Path) else value
    return out
