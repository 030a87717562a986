"""Flag defaults taken from the settings dataclasses, so the CLI and the Python API agree.

Every ``raysky`` command builds a settings object (``TrainSettings``, ``ScoreSettings``,
``ServeSettings``, ...) from its flags; a default written again in the parser would drift from
the dataclass's. :func:`settings_defaults` reads them from the class instead.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any


def settings_defaults(settings_class: type) -> dict[str, Any]:
    """Field name -> default of a settings dataclass (fields without one are left out)."""
    defaults = {}
    for field in fields(settings_class):
        if field.default is not MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not MISSING:
            defaults[field.name] = field.default_factory()
    return defaults
