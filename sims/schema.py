"""One way to check configuration mappings, and one error type for every bad value.

Run configs (``hil.config``), lab configs (``hil.bench.lab``), virtual-lab world files
(``sims.virtual_lab.config``) and simulated-chip settings (``sims.oscillator_device``) all
validate with these helpers and raise :class:`ConfigError` (or a subclass), so a user, a test
or the CLI catches one type whose message reads ``"{source}: {key}: {message}"``: the file (or
"command line"), the dotted key and what is allowed.

Types come from the dataclass fields' real annotations (``typing.get_type_hints``), never from
their text: ``int``, ``float``, ``bool`` (strict: only true/false), ``str``, ``X | None``,
``Literal[...]``, ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``, mappings and ``Any``. A field
may name its allowed values with ``metadata=choices(...)``.

Dependency-free on purpose (stdlib only): ``sims`` and ``drivers`` may import nothing of the
project, while ``hil`` builds on this module.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "ConfigError", "apply_mapping", "check_choice", "check_choices", "check_keys", "choices",
    "coerce", "complete_mapping", "deep_merge", "describe", "field_types", "yaml_number_hint",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range.

    ``source``: the file (or "command line"; None when unknown), ``key``: the dotted key,
    ``message``: what is wrong and what is allowed. ``str()`` is ``"{source}: {key}: {message}"``
    (without ``"{source}: "`` when the source is None).
    """

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key = key
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        # subclasses keep other constructor signatures: rebuild from the attributes
        return _rebuild, (type(self), self.key, self.message, self.source)


def _rebuild(cls: type[ConfigError], key: str, message: str, source: str | None) -> ConfigError:
    err = cls.__new__(cls)
    ConfigError.__init__(err, key, message, source)
    return err


# ----------------------------------------------------------------------------- field types

_CHOICES = "choices"
_WHAT = "what"


def choices(values: Iterable[Any], what: str = "value") -> dict[str, Any]:
    """Field metadata naming the allowed values, ``what`` they are called in messages
    ("unknown method 'rk4'; allowed: ..."): ``field(default="a", metadata=choices(AB))``."""
    return {_CHOICES: tuple(values), _WHAT: what}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of dataclass ``cls`` (strings evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _optional(tp: Any) -> tuple[Any, bool]:
    """(``tp`` without ``None``, whether ``None`` is allowed)."""
    if tp is type(None):
        return tp, True
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        allows_none = len(args) < len(typing.get_args(tp))
        rest = args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
        return rest, allows_none
    return tp, False


def describe(tp: Any, allowed: Iterable[Any] | None = None) -> str:
    """What a value of annotation ``tp`` must be, in words (for messages)."""
    inner, allows_none = _optional(tp)
    if allowed is not None:
        text = "one of " + ", ".join(map(str, allowed))
    elif typing.get_origin(inner) is typing.Literal:
        text = "one of " + ", ".join(map(str, typing.get_args(inner)))
    elif _is_union(inner):
        text = " or ".join(describe(a) for a in typing.get_args(inner))
    elif inner is bool:
        text = "true or false"
    elif inner is int:
        text = "an integer"
    elif inner is float:
        text = "a number"
    elif inner is str:
        text = "a string"
    elif inner is Any:
        text = "any value"
    elif typing.get_origin(inner) in (list, tuple) or inner in (list, tuple):
        args = typing.get_args(inner)
        if typing.get_origin(inner) is tuple and args and args[-1] is not Ellipsis:
            text = f"a list of {len(args)}: [" + ", ".join(describe(a) for a in args) + "]"
        else:
            text = f"a list of {_plural(describe(args[0]))}" if args else "a list"
    elif typing.get_origin(inner) in (dict, Mapping) or inner in (dict, Mapping):
        text = "a mapping"
    else:
        text = getattr(inner, "__name__", str(inner))
    return f"{text} or null" if allows_none else text


def _plural(text: str) -> str:
    for article in ("an ", "a "):
        if text.startswith(article):
            return text[len(article):] + "s"
    return text


def yaml_number_hint(value: Any) -> str:
    """``"; note: ..."`` when ``value`` (or one of its items) is text that reads as a number:
    YAML 1.1 reads ``1.0e9`` as text (its exponent needs a sign). Else ``""``."""
    if isinstance(value, Mapping):
        items: Iterable[Any] = value.values()
    elif isinstance(value, list | tuple):
        items = value
    else:
        items = (value,)
    for item in items:
        if isinstance(item, str):
            try:
                float(item)
            except ValueError:
                continue
            return f"; note: YAML reads {item!r} as text, write numbers like 1.0e+9"
    return ""


def _number_text(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def coerce(value: Any, tp: Any, key: str, source: str | None = None, *,
           allowed: Iterable[Any] | None = None, what: str = "value",
           number_text: bool = False) -> Any:
    """``value`` converted to annotation ``tp``, or :class:`ConfigError` naming ``key``.

    Integers are accepted for floats (converted), integral floats for integers; booleans only
    as true/false (never 0/1 or text). ``number_text``: accept text that reads as a number
    (what YAML makes of ``2e-5`` on a command line); else such text is refused with a hint.
    ``allowed``: the values a non-null value (a ``what``) must be one of.
    """
    inner, allows_none = _optional(tp)
    if value is None:
        if allows_none or inner is Any:
            return None
        raise ConfigError(key, f"must not be null; expected {describe(tp, allowed)}", source)
    out = _convert(value, inner, key, source, number_text, shown=tp)
    if allowed is not None:
        check_choice(out, allowed, key, source, nullable=allows_none, what=what)
    return out


_FAIL = object()


def _convert(value: Any, tp: Any, key: str, source: str | None, number_text: bool,
             shown: Any = None) -> Any:
    """``value`` as type ``tp`` (not None); the error names ``shown`` (default ``tp``)."""
    origin = typing.get_origin(tp)
    out: Any = _FAIL
    if tp is Any:
        out = value
    elif origin is typing.Literal:
        options = typing.get_args(tp)
        if value in options and not (isinstance(value, bool) and True not in options
                                     and False not in options):
            return value
        raise ConfigError(key, f"unknown value {value!r}; allowed: "
                          f"{', '.join(map(str, options))}", source)
    elif _is_union(tp):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key, source, number_text)
            except ConfigError:
                continue
    elif tp is bool:
        out = value if isinstance(value, bool) else _FAIL
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        elif number_text and (num := _number_text(value)) is not None and num.is_integer():
            out = int(num)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            out = float(value)
        elif number_text and (num := _number_text(value)) is not None:
            out = num
    elif tp is str:
        out = value if isinstance(value, str) else _FAIL
    elif origin in (list, tuple) or tp in (list, tuple):
        out = _sequence(value, tp, key, source, number_text)
    elif origin in (dict, Mapping) or tp in (dict, Mapping):
        out = dict(value) if isinstance(value, Mapping) else _FAIL
    elif isinstance(tp, type) and isinstance(value, tp):
        out = value
    if out is _FAIL:
        hint = "" if number_text else yaml_number_hint(value)
        raise ConfigError(key, f"expected {describe(tp if shown is None else shown)}, got {value!r} "
                          f"({type(value).__name__}){hint}", source)
    return out


def _sequence(value: Any, tp: Any, key: str, source: str | None, number_text: bool) -> Any:
    if not isinstance(value, list | tuple):
        return _FAIL
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(key, f"expected {describe(tp)}, got {len(value)} value(s): "
                              f"{list(value)!r}", source)
        items = [_convert(v, a, f"{key}[{i}]", source, number_text)
                 for i, (v, a) in enumerate(zip(value, args, strict=True))]
    else:
        item_tp = args[0] if args else Any
        items = [coerce(v, item_tp, f"{key}[{i}]", source, number_text=number_text)
                 for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def check_choice(value: Any, allowed: Iterable[Any], key: str, source: str | None = None, *,
                 nullable: bool = False, what: str = "value") -> None:
    """Refuse ``value`` (a ``what``) unless it is one of ``allowed`` (naming them all, and null
    where ``nullable``)."""
    allowed = tuple(allowed)
    if value not in allowed or (isinstance(value, bool) and not any(
            isinstance(a, bool) for a in allowed)):
        null = " or null" if nullable else ""
        raise ConfigError(key, f"unknown {what} {value!r}; allowed: "
                          f"{', '.join(map(str, allowed))}{null}", source)


def check_choices(obj: Any, prefix: str = "", source: str | None = None) -> None:
    """Check every field of dataclass instance ``obj`` that has ``choices`` metadata (a null
    value passes where the annotation allows it)."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        allowed = f.metadata.get(_CHOICES)
        value = getattr(obj, f.name)
        nullable = _optional(hints[f.name])[1]
        if allowed is not None and not (value is None and nullable):
            check_choice(value, allowed, _join(prefix, f.name), source, nullable=nullable,
                         what=f.metadata.get(_WHAT, "value"))


# ----------------------------------------------------------------------------- mappings

def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_keys(given: Mapping[str, Any], allowed: Iterable[str], prefix: str = "",
               source: str | None = None, *, removed: Mapping[str, str] | None = None,
               renamed: Mapping[str, str | tuple[str, str]] | None = None) -> None:
    """Refuse the first key of ``given`` that is not ``allowed``: a ``removed`` one with its
    reason (old name -> why), a ``renamed`` one naming the new name (old name -> new name, or
    (new name, why)), any other one listing the allowed keys."""
    allowed = tuple(allowed)
    for k in given:
        key = _join(prefix, str(k))
        if removed and k in removed:
            raise ConfigError(key, f"removed: {removed[k]}; delete it from the config", source)
        if renamed and k in renamed:
            new, why = (renamed[k], "") if isinstance(renamed[k], str) else renamed[k]
            why = f" ({why})" if why else ""
            raise ConfigError(key, f"renamed to {new!r}{why}; write {_join(prefix, new)} "
                              "instead", source)
        if k not in allowed:
            raise ConfigError(key, f"unknown key; allowed: {', '.join(allowed)}", source)


def apply_mapping(obj: Any, values: Mapping[str, Any], prefix: str = "",
                  source: str | None = None, *, removed: Mapping[str, str] | None = None,
                  renamed: Mapping[str, str | tuple[str, str]] | None = None,
                  number_text: bool = False) -> Any:
    """Set the fields of dataclass instance ``obj`` from ``values``, each converted to its
    field's annotation (and checked against its ``choices``); returns ``obj``. Unknown,
    removed and renamed keys are refused as :func:`check_keys` does."""
    if not isinstance(values, Mapping):
        raise ConfigError(prefix or "(top level)", f"must be a mapping, got "
                          f"{type(values).__name__}", source)
    hints = field_types(type(obj))
    check_keys(values, hints, prefix, source, removed=removed, renamed=renamed)
    meta = {f.name: f.metadata for f in dataclasses.fields(obj)}
    for k, v in values.items():
        setattr(obj, k, coerce(v, hints[k], _join(prefix, k), source,
                               allowed=meta[k].get(_CHOICES), what=meta[k].get(_WHAT, "value"),
                               number_text=number_text))
    return obj


def complete_mapping(given: Any, defaults: Mapping[str, Any], prefix: str = "",
                     source: str | None = None, *,
                     merge: Callable[[Any, Any], Any] | None = None,
                     removed: Mapping[str, str] | None = None,
                     renamed: Mapping[str, str | tuple[str, str]] | None = None) -> dict[str, Any]:
    """``given`` (a mapping or None) checked against ``defaults`` and completed from them.

    Unknown keys are refused; where the default is a float the value must be a number
    (converted to float; text like ``1.0e9`` is refused with the YAML hint). ``merge(defaults,
    given)`` completes the mapping (default: nested mappings merge key by key, anything else
    replaces).
    """
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise ConfigError(prefix or "(top level)", f"must be a mapping, got "
                          f"{type(given).__name__}", source)
    check_keys(given, defaults, prefix, source, removed=removed, renamed=renamed)
    out = dict((merge or deep_merge)(defaults, given))
    for name, default in defaults.items():
        if isinstance(default, float):
            out[name] = coerce(out[name], float, _join(prefix, name), source)
    return out


def deep_merge(base: Any, over: Any, replace_key: str | None = None) -> Any:
    """``over`` merged into a copy of ``base``: mappings merge key by key, the rest replaces;
    with ``replace_key``, a mapping of ``over`` marked ``{replace_key: true}`` replaces too."""
    if replace_key is not None and isinstance(over, Mapping) and over.get(replace_key) is True:
        return {k: copy.deepcopy(v) for k, v in over.items() if k != replace_key}
    if isinstance(base, Mapping) and isinstance(over, Mapping):
        out = {k: copy.deepcopy(v) for k, v in base.items()}
        for key, value in over.items():
            out[key] = (deep_merge(out[key], value, replace_key) if key in out
                        else copy.deepcopy(value))
        return out
    return copy.deepcopy(over)
