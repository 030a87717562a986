"""Batch scoring of image archives with Ray Data: ``score_archive``, ``pack``, ``export``, the
ONNX Runtime engine and the ``raysky robustness`` run. Public names load on first use
(:mod:`raysky.exports`), so the settings never pull in Ray.
"""

from __future__ import annotations

from raysky.exports import lazy_exports

_MODULES = {
    "ScoreSettings": "settings", "ScoringResources": "settings", "RobustnessSettings": "settings",
    "ScoreSummary": "pipeline", "score_archive": "pipeline",
}
__all__ = sorted(_MODULES)
__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
