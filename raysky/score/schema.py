"""The columns of a results file, defined once: the writer (:mod:`raysky.score.stages`) builds
its tables in :func:`output_schema`, and the reader (:mod:`raysky.score.results`) derives from
it where the columns added since the first format go when it reads older files.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

PROB_PREFIX = "prob_"
"""Per-class probability columns are named ``prob_<class code>``."""

ADDED_COLUMNS: tuple[str, ...] = ("error_kind", "refer", "ood_score", "ood", "ita_deg",
                                  "skin_tone", "calibration_version")
"""Columns newer than some results on disk; readers fill them with nulls there."""


def output_schema(classes: Sequence[str], heatmaps: bool) -> pa.Schema:
    """The columns of a result file, in order: plain Arrow types only.

    ``refer``, ``ood_score``, ``ood`` and ``calibration_version`` are null when the classifier
    checkpoint has no calibration (see :mod:`raysky.calibration`); ``ita_deg`` and
    ``skin_tone`` are null where the skin round the lesion cannot be measured.
    """
    fields = [
        ("image_id", pa.string()), ("source_uri", pa.string()), ("status", pa.string()),
        ("error", pa.string()), ("error_kind", pa.string()), ("width", pa.int32()),
        ("height", pa.int32()),
        ("predicted_class", pa.string()),
        *[(f"{PROB_PREFIX}{code}", pa.float32()) for code in classes],
        ("malignant_prob", pa.float32()), ("refer", pa.bool_()), ("ood_score", pa.float32()),
        ("ood", pa.bool_()), ("ita_deg", pa.float32()), ("skin_tone", pa.string()),
        ("mask_png", pa.binary()),
        ("lesion_area_frac", pa.float32()),
        *([("heatmap_png", pa.binary())] if heatmaps else []),
        ("lesion_focus", pa.float32()), ("segmenter_version", pa.string()),
        ("classifier_version", pa.string()), ("calibration_version", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
    return pa.schema(fields)


def model_output_schema(classes: Sequence[str], heatmaps: bool) -> pa.Schema:
    """The model stage's rows: the output columns with raw ``uint8`` maps instead of PNGs."""
    schema = output_schema(classes, heatmaps)
    for name, raw in (("mask_png", "mask_raw"), ("heatmap_png", "heatmap_raw")):
        index = schema.get_field_index(name)
        if index >= 0:
            schema = schema.set(index, pa.field(raw, pa.large_binary()))
    return schema


def added_column_places() -> dict[str, tuple[str, str]]:
    """``name: (column it follows, pandas dtype)`` for each of :data:`ADDED_COLUMNS`, from
    :func:`output_schema`, so a column read as null from an older file lands where newer files
    have it, with the dtype they give it."""
    fields = output_schema((), heatmaps=False)
    places = {}
    for name in ADDED_COLUMNS:
        index = fields.get_field_index(name)
        dtype = "float32" if fields.field(index).type == pa.float32() else "object"
        places[name] = (fields.names[index - 1], dtype)
    return places
