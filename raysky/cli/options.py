"""Flags whose default and help come from the settings dataclasses, so the CLI and the Python
API agree.

Every ``raysky`` command builds a settings object (``TrainSettings``, ``ScoreSettings``,
``ServeSettings``, ...) from its flags; a default or a help text written again in the parser
would drift from the dataclass's. :func:`add_setting` declares a flag from a field (declared
with :func:`raysky.settings.setting`), and :func:`settings_from_args` turns the parsed flags
back into the settings object. A dotted field name (``score.batch_size``) reaches into a
settings object nested in another (:attr:`raysky.score.RobustnessSettings.score`): the help is
the nested class's, the default the outer field's default object's. Flags that only steer the
command line (``--json``, ``--quiet``) keep their help in the parser.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from dataclasses import MISSING, Field, fields, is_dataclass, replace
from typing import Any, TypeVar

from raysky.settings import setting_help

SETTING_DESTS = "_setting_dests"
"""Namespace attribute where each parser keeps dest -> (settings class, field, from_flag)."""

# Flags with these actions say on or off; "(default: False)" would tell nothing.
_SWITCHES = ("store_true", "store_false", "store_const")

S = TypeVar("S")


def settings_defaults(settings_class: type) -> dict[str, Any]:
    """Field name -> default of a settings dataclass (fields without one are left out)."""
    defaults = {}
    for f in fields(settings_class):
        default = _default(f)
        if default is not MISSING:
            defaults[f.name] = default
    return defaults


def parameter_defaults(function: Callable[..., Any]) -> dict[str, Any]:
    """Parameter name -> default of ``function``, for commands that call one function rather
    than build a settings object (``raysky report`` and :func:`raysky.review.report.build_report`),
    so the flag and the Python API cannot disagree."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _field(settings_class: type, name: str) -> Field:
    for f in fields(settings_class):
        if f.name == name:
            return f
    raise KeyError(f"{settings_class.__name__} has no field {name!r}")


def resolve_setting(settings_class: type, name: str) -> tuple[type, str, Any]:
    """(class declaring the field, its name there, its default) for field ``name`` of
    ``settings_class``, where a dotted name walks into nested settings objects.

    The default of a nested field is the one of the object its outer field defaults to, so an
    outer class keeps its own defaults (robustness scores in smaller batches than ``raysky
    score``) while the help stays where the field is declared.
    """
    *path, leaf = name.split(".")
    owner, nested = settings_class, None
    for part in path:
        value = getattr(nested, part) if nested is not None else _default(_field(owner, part))
        if not is_dataclass(value):
            raise KeyError(f"{owner.__name__}.{part} holds no settings object to reach into")
        owner, nested = type(value), value
    default = _default(_field(owner, leaf)) if nested is None else getattr(nested, leaf)
    return owner, leaf, default


def _assemble(settings_class: type, values: dict[str, Any], base: Any = None) -> Any:
    """``settings_class(**values)`` (or ``base`` with ``values`` replaced), where dotted names
    set fields of the nested object their outer field holds, starting from its default."""
    flat: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        outer, dot, inner = key.partition(".")
        if dot:
            nested.setdefault(outer, {})[inner] = value
        else:
            flat[key] = value
    for outer, inner_values in nested.items():
        start = flat.get(outer, MISSING)
        if start is MISSING:
            start = getattr(base, outer) if base is not None else _default(_field(settings_class, outer))
        flat[outer] = _assemble(type(start), inner_values, start)
    return replace(base, **flat) if base is not None else settings_class(**flat)


def add_setting(parser: argparse._ActionsContainer, settings_class: type, name: str,
                *flags: str, note: str | None = None, to_flag: Callable[[Any], Any] | None = None,
                from_flag: Callable[[Any], Any] | None = None, **kwargs: Any) -> argparse.Action:
    """Add the flag ``flags`` for field ``name`` of ``settings_class`` to ``parser`` (or group).

    ``name`` may be dotted, for a field of a nested settings object (see :func:`resolve_setting`).
    The flag's default is the field's (through ``to_flag`` where the flag counts in other units
    than the field, e.g. milliseconds for seconds; ``from_flag`` converts back in
    :func:`settings_from_args`); a field without a default makes a required flag. The help is
    the field's, then ``note`` (what only this flag needs to say), then ``(default: ...)`` when
    the default is a value rather than None or a switch's off state; a ``store_false`` flag
    reads "don't <help>". ``kwargs`` go to ``add_argument`` as they are (type, choices, metavar,
    dest, action); ``default`` and ``help`` are not accepted, they are the field's.
    """
    if "default" in kwargs or "help" in kwargs:
        raise TypeError(f"--{name}: the default and the help come from "
                        f"{settings_class.__name__}.{name}")
    owner, leaf, default = resolve_setting(settings_class, name)
    # argparse %-formats help strings; a literal % in a field's help must survive that.
    text = setting_help(owner, leaf).replace("%", "%%")
    action_name = kwargs.get("action")
    if action_name == "store_false":
        text = f"don't {text}"
    if note:
        text = f"{text}; {note}"
    if default is MISSING:
        kwargs.setdefault("required", True)
    else:
        if to_flag is not None and default is not None:
            default = to_flag(default)
        kwargs["default"] = default
        if default is not None and action_name not in _SWITCHES and not isinstance(default, bool):
            text = f"{text} (default: %(default)s)"
    action = parser.add_argument(*flags, help=text, **kwargs)
    dests = dict(parser.get_default(SETTING_DESTS) or {})
    dests[action.dest] = (settings_class, name, from_flag)
    parser.set_defaults(**{SETTING_DESTS: dests})
    return action


def settings_from_args(settings_class: type[S], args: argparse.Namespace, **overrides: Any) -> S:
    """The ``settings_class`` object that the flags declared with :func:`add_setting` describe.

    Each such flag's value goes to its field (through its ``from_flag``); ``overrides`` set the
    fields that other flags decide (``--quiet`` for ``progress``) or that the command computes
    (API keys it has read) and win over a flag of the same field. Dotted names, in flags and
    overrides alike, set fields of a nested settings object, the rest of which keeps the outer
    field's default.
    """
    dests = getattr(args, SETTING_DESTS, None) or {}
    values = {}
    for dest, (cls, name, from_flag) in dests.items():
        if cls is settings_class:
            value = getattr(args, dest)
            values[name] = from_flag(value) if from_flag is not None and value is not None else value
    values.update(overrides)
    return _assemble(settings_class, values)
