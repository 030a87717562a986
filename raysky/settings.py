"""Fields of the settings dataclasses that carry their own help text.

Each ``raysky`` command builds a settings object (``ScoreSettings``, ``ServeSettings``,
``TrainSettings``, ...) from its flags. A field declared with :func:`setting` keeps the
sentence that explains it next to its default, so the command line
(:func:`raysky.cli.options.add_setting`) and the Python API describe it in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

HELP = "help"
"""The field-metadata key holding a field's help text."""


def setting(default: Any = dataclasses.MISSING, *, help: str,
            default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field with ``default`` (or ``default_factory``) and ``help`` as metadata.

    Leave both defaults out for a field the caller must always give. The help is a short
    phrase in the style of argparse's, without the default: the command line appends that
    itself where it means something.
    """
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={HELP: help})


def setting_help(settings_class: type, name: str) -> str:
    """The help text of field ``name`` of ``settings_class``; ``KeyError`` if it has none.

    A missing field or a field declared without :func:`setting` is an error rather than an
    empty help line, so a flag cannot lose its explanation without a test noticing.
    """
    for f in dataclasses.fields(settings_class):
        if f.name == name:
            if HELP not in f.metadata:
                raise KeyError(f"{settings_class.__name__}.{name} has no help text "
                               "(declare it with raysky.settings.setting)")
            return f.metadata[HELP]
    raise KeyError(f"{settings_class.__name__} has no field {name!r}")


TTA_HELP = ("test-time augmentation: average the models over the eight flips and transposes "
            "of each image (8x the model work; Grad-CAM explains the original view)")
"""Scoring and serving run the same test-time augmentation (:class:`raysky.inference.LesionPipeline`)."""


class ParameterError(ValueError):
    """A value a caller gave that cannot work, naming the parameter it came in.

    Below :mod:`raysky.cli` errors speak in Python parameter names (``split='test': needs
    ...``); the command line says the same with its flag (``--split test: needs ...``, see
    :func:`raysky.cli.main.main`), so neither reader meets the other's vocabulary.

    A problem whose fix lies in another parameter names it as a ``{name}`` placeholder and
    lists it in ``mentions``, mapped to the value the fix sets, or to ``None`` where the text
    names the parameter alone. Python callers then read ``force_resume=True`` (or ``workers``),
    the command line ``--force-resume`` (or ``--workers``), so a fix is said in the caller's
    own words too.
    """

    def __init__(self, parameter: str, value: Any, problem: str, *,
                 mentions: Mapping[str, Any] | None = None):
        self.parameter, self.value, self.problem = parameter, value, problem
        self.mentions = dict(mentions or {})
        super().__init__(f"{parameter}={value!r}: {self._filled(lambda name: name)}")

    def with_flag(self, flag: str, flag_of: Callable[[str], str] | None = None) -> str:
        """The message as the command line says it, with ``flag`` for the parameter and
        ``flag_of(name)`` for each parameter the problem mentions (the Python name where
        ``flag_of`` is not given or the command has no flag for it)."""
        return f"{flag} {_typed(self.value)}: {self._filled(flag_of or (lambda name: name))}"

    def _filled(self, flag_of: Callable[[str], str]) -> str:
        """``problem`` with each mentioned parameter said through ``flag_of``: a flag (starts
        with ``-``) as typed on a command line, anything else as a Python keyword argument."""
        text = self.problem
        for name, value in self.mentions.items():
            flag = flag_of(name)
            if not flag.startswith("-"):
                said = name if value is None else f"{name}={value!r}"
            elif value is None or value is True:
                said = flag  # a switch's flag alone turns it on
            else:
                said = f"{flag} {_typed(value)}"
            text = text.replace("{" + name + "}", said)
        return text


def _typed(value: Any) -> str:
    """``value`` as a command line's user would type it: lists comma-separated, a string that
    is empty or holds spaces or control characters quoted."""
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    if isinstance(value, str) and (not value or not value.isprintable() or " " in value):
        return repr(value)
    return str(value)
