"""Batch scoring of image archives with Ray Data: ``score_archive``, ``pack`` and ``export``."""

from raysky.score.pipeline import ScoreSettings, ScoreSummary, score_archive

__all__ = ["ScoreSettings", "ScoreSummary", "score_archive"]
