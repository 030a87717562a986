"""Data shipped inside the raysky package, so an installed wheel has it too.

``SAMPLE_DIR`` is the 35-image HAM10000 sample (images, lesion masks, metadata) that ``raysky
demo`` runs on by default and the tests use. It is CC BY-NC 4.0, unlike raysky's code: its
``README.md`` and ``LICENSE.txt`` travel beside it wherever it is installed.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent / "ham10000_sample"
"""The bundled HAM10000 sample, in the ``ham10000`` layout."""

__all__ = ["SAMPLE_DIR"]
