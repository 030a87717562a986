"""The columns of a results file, defined once: the writer (:mod:`raysky.score.stages`) builds
its tables in :func:`output_schema`, and the reader (:mod:`raysky.results.reader`) derives from
it where the columns added since the first format go when it reads older files. The model's
classes are named by the ``prob_<class>`` columns (:func:`class_columns`,
:func:`result_classes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from raysky.data.taxonomy import canonical_label, order_classes

PROB_PREFIX = "prob_"
"""Per-class probability columns are named ``prob_<class code>``."""

INPUT_FACTS: tuple[tuple[str, pa.DataType], ...] = (
    ("lesion_id", pa.string()), ("patient_id", pa.string()),
    ("age", pa.float32()), ("age_source", pa.string()),
    ("sex", pa.string()), ("sex_source", pa.string()),
    ("site", pa.string()), ("site_source", pa.string()),
    ("manufacturer", pa.string()), ("manufacturer_model", pa.string()),
    ("polarization", pa.string()), ("contact_method", pa.string()),
    ("warning", pa.string()),
)
"""What is known about each input besides its pixels, after the model columns: its lesion and
patient; the metadata the classifier was given, each with its source (``manifest``,
``metadata`` for a ``--metadata`` CSV, ``dicom`` for the header; null when unknown); a DICOM's
device facts (Manufacturer, Manufacturer's Model Name, Light Source Polarization, Contact
Method); and a ``warning`` about the input that did not stop it being scored (a malformed
DICOM PatientAge)."""
CASE_COLUMNS: tuple[str, ...] = ("lesion_id", "patient_id")
"""The columns results can be grouped by into cases (:mod:`raysky.results.cases`)."""
SOURCES: tuple[str, ...] = ("manifest", "metadata", "dicom")
"""Values of ``age_source``, ``sex_source`` and ``site_source``."""

ADDED_COLUMNS: tuple[str, ...] = ("error_kind", "refer", "ood_score", "ood", "ita_deg",
                                  "skin_tone", "calibration_version",
                                  *(name for name, _type in INPUT_FACTS))
"""Columns newer than some results on disk; readers fill them with nulls there."""


def output_schema(classes: Sequence[str], heatmaps: bool,
                  extra: pa.Schema | None = None) -> pa.Schema:
    """The columns of a result file, in order: plain Arrow types only.

    ``refer``, ``ood_score``, ``ood`` and ``calibration_version`` are null when the classifier
    checkpoint has no calibration (see :mod:`raysky.calibration`); ``ita_deg`` and
    ``skin_tone`` are null where the skin round the lesion cannot be measured. The
    :data:`INPUT_FACTS` follow, then ``extra``: a manifest's own columns, passed through.
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
        *INPUT_FACTS,
    ]
    return pa.schema([*fields, *(extra or [])])


def model_output_schema(classes: Sequence[str], heatmaps: bool,
                        extra: pa.Schema | None = None) -> pa.Schema:
    """The model stage's rows: the output columns with raw ``uint8`` maps instead of PNGs."""
    schema = output_schema(classes, heatmaps, extra)
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


def class_columns(frame_or_schema) -> list[str]:
    """The ``prob_<class>`` columns, in file order."""
    names = frame_or_schema.columns if hasattr(frame_or_schema, "columns") else frame_or_schema.names
    return [name for name in names if name.startswith(PROB_PREFIX)]


def result_classes(frame, source: str = "results") -> tuple[str, ...]:
    """The model's classes, from the ``prob_<class>`` columns of ``frame``, in canonical order.

    A column whose suffix is not a known diagnosis, or not its canonical code, is a
    ``ValueError`` naming ``source`` and the column.
    """
    codes = []
    for name in class_columns(frame):
        suffix = name[len(PROB_PREFIX):]
        try:
            code = canonical_label(suffix)
        except ValueError as exc:
            raise ValueError(f"{source}: column {name!r}: {exc}") from None
        if code != suffix:
            raise ValueError(f"{source}: column {name!r} should be {PROB_PREFIX}{code}")
        codes.append(code)
    return order_classes(codes)
