"""Typed settings: a dataclass read from a recipe mapping, each value checked against its field's type.

``Settings.from_mapping(where, data)`` refuses an unknown key (naming the close one), converts what YAML gives
(``1e-3`` read as a string is a number), refuses a value of the wrong type and runs ``validate``: every mistake
is one ``ConfigError`` before any data is read. ``to_dict`` gives back the keys the recipe wrote and those that
differ from their defaults, so a recipe's recorded form is the one it was written in.
"""
from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError

S = TypeVar("S", bound="Settings")


@dataclass
class Settings:
    """Base of every typed settings class (``TrainConfig``'s sub-settings, the QAT levers' settings)."""

    #: keys written by ``to_dict`` even at their default value
    ALWAYS: ClassVar[tuple[str, ...]] = ()
    _given: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The keys a recipe may set."""
        return tuple(f.name for f in fields(cls) if f.init)

    @classmethod
    def from_mapping(cls: type[S], where: str, data: Any) -> S:
        """The settings ``data`` (a mapping) asks for, checked; ``where`` names them in errors."""
        if isinstance(data, cls):
            obj = data
        elif not isinstance(data, dict):
            raise ConfigError(f"setting {where!r} must be a mapping (or null); got {data!r}")
        else:
            obj = cls._read(where, data)
        try:  # a settings object given as it is is checked too
            obj.validate()
        except (TypeError, ValueError) as exc:
            message = str(exc)  # named already ("teacher.source must be ...", "quant: ...") or named here
            raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None
        return obj

    @classmethod
    def _read(cls: type[S], where: str, data: dict[str, Any]) -> S:
        """The settings of a mapping: its keys known, its values converted to their fields' types."""
        known = cls.keys()
        unknown = sorted(map(str, set(data) - set(known)))
        if unknown:
            close = [c[0] for k in unknown if (c := difflib.get_close_matches(k, known, n=1))]
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}{hint}; valid keys: {', '.join(known)}")
        types = {f.name: f.type for f in fields(cls)}
        values = {k: coerce(f"{where}.{k}", types[k], v) for k, v in data.items()}
        obj = cls(**values)
        object.__setattr__(obj, "_given", frozenset(values))
        return obj

    def validate(self) -> None:
        """Raise ``ValueError`` (or ``ConfigError``) for a value out of range; subclasses add their checks."""

    def to_dict(self) -> dict[str, Any]:
        """The keys given or always written, and every value that differs from its default."""
        out = {}
        for f in fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if f.name in self._given or f.name in self.ALWAYS or value != default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def coerce(name: str, kind: str, value: Any) -> Any:
    """``value`` as the type ``kind`` (a field's annotation, as text) of the setting ``name``, or ``ConfigError``.

    YAML reads ``1e-3`` as a string: numbers given as strings are converted; an integral float is accepted for
    an ``int`` and a number for a ``str`` (``out=123``); anything else of the wrong type is refused here, before
    it can fail somewhere inside training. Unions (``str | list[str] | None``) take the first type that fits."""
    options = [k.strip() for k in kind.split("|")]
    if value is None:
        if "None" in options or options[0].startswith("dict"):
            return None
        raise ConfigError(f"setting {name!r} cannot be null")
    errors = []
    for option in (o for o in options if o != "None"):
        try:
            return _coerce_one(name, option, value)
        except ConfigError as exc:
            errors.append(exc)
    raise errors[0] if len(errors) == 1 else ConfigError(f"setting {name!r} must be {kind}; got {value!r}")


def _coerce_one(name: str, base: str, value: Any) -> Any:
    if base in ("int", "float"):
        if isinstance(value, str):
            try:
                value = float(value) if base == "float" else int(value)
            except ValueError:
                raise ConfigError(f"setting {name!r} must be a number; got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"setting {name!r} must be a number; got {value!r}")
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"setting {name!r} must be an integer; got {value!r}")
            return int(value)
        return value
    if base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"setting {name!r} must be true or false; got {value!r}")
        return value
    if base == "str":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"setting {name!r} must be a string; got {value!r}")
        return value
    if base.startswith("list[str]"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"setting {name!r} must be a list of strings; got {value!r}")
        return list(value)
    if base.startswith("tuple"):
        try:
            pair = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            pair = ()
        if len(pair) != 2 or isinstance(value, (str, dict)):
            raise ConfigError(f"setting {name!r} must be a pair of numbers [a, b]; got {value!r}")
        return pair
    if base.startswith("dict") and not isinstance(value, dict):
        raise ConfigError(f"setting {name!r} must be a mapping; got {value!r}")
    return value
