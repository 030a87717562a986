"""Results per case: one row per lesion or per patient, the unit a clinician reviews.

Scoring writes one row per image; a lesion is often photographed several times and a patient
has several lesions. :func:`cases` folds the image rows (one per input, from
:func:`raysky.results.read`) into one row per ``lesion_id`` or ``patient_id``:

* ``images``, ``errors``: how many images the case has, and how many could not be scored;
* ``malignant_prob``: the highest over its scored images, with ``top_image_id`` and
  ``top_predicted_class`` of that image, so the image to look at first is named;
* ``refer``: whether any image is referred (``referred_images`` counts them); null when no
  image has a referral decision (a classifier without calibration);
* ``ood``: the worst out-of-distribution flag (true if any image is flagged,
  ``ood_images`` counts them); null when none has one;
* ``patient_id`` of a lesion, or the number of ``lesions`` of a patient; ``image_ids``.

Images without the case column are never dropped: each is a case of its own, with the case
column null. Cases are sorted by ``malignant_prob``, highest first.
"""

from __future__ import annotations

import pandas as pd

from raysky.results.columns import CASE_COLUMNS
from raysky.results.reader import OPTIONAL_COLUMNS, read, schema

_READ = ("image_id", "status", "malignant_prob", "predicted_class", "refer", "ood",
         "lesion_id", "patient_id")


def _flag(values: pd.Series) -> object:
    """True if any value is true, False if all known values are false, None if none is known."""
    known = values.dropna()
    if known.empty:
        return None
    return bool(known.astype(bool).any())


def _case(rows: pd.DataFrame, by: str) -> dict:
    ok = rows[rows["status"] == "ok"]
    top = (ok.sort_values(["malignant_prob", "image_id"], ascending=[False, True],
                          na_position="last").iloc[0] if len(ok) else None)
    key = rows[by].iloc[0]
    case = {
        by: None if pd.isna(key) else key, "images": len(rows), "errors": int((rows["status"] != "ok").sum()),
        "malignant_prob": None if top is None or pd.isna(top["malignant_prob"])
        else float(top["malignant_prob"]),
        "top_image_id": None if top is None else top["image_id"],
        "top_predicted_class": None if top is None else top["predicted_class"],
        "refer": _flag(ok["refer"]), "referred_images": int(ok["refer"].eq(True).sum()),
        "ood": _flag(ok["ood"]), "ood_images": int(ok["ood"].eq(True).sum()),
    }
    if by == "lesion_id":
        patients = rows["patient_id"].dropna().unique()
        case["patient_id"] = ";".join(sorted(map(str, patients))) if len(patients) else None
    else:
        case["lesions"] = int(rows["lesion_id"].dropna().nunique())
    case["image_ids"] = sorted(rows["image_id"].astype(str))
    return case


def cases(source: str | pd.DataFrame, by: str = "lesion_id") -> pd.DataFrame:
    """One row per ``by`` value (``lesion_id`` or ``patient_id``) of the results ``source``
    (a results URI, or a frame from :func:`raysky.results.read`); see the module docstring.

    Raises ``ValueError`` when ``by`` is not a case column, or when no image has a value in
    it (results scored without a manifest or metadata that names lesions or patients).
    """
    if by not in CASE_COLUMNS:
        raise ValueError(f"cannot group results by {by!r}: expected one of "
                         f"{', '.join(CASE_COLUMNS)}")
    if isinstance(source, str):
        there = {*schema(source).names, *OPTIONAL_COLUMNS}
        frame = read(source, [name for name in _READ if name in there])
    else:
        frame = source.copy()
    for name in _READ:
        if name not in frame.columns:
            frame[name] = None
    if frame.empty or frame[by].isna().all():
        where = source if isinstance(source, str) else "the results"
        raise ValueError(f"no image in {where} has a {by}: score with a manifest or a "
                         f"metadata CSV that has a {by} column")
    # An image without a case value is a case of its own, never dropped.
    key = frame[by].astype(object).where(frame[by].notna(), "\0image:" + frame["image_id"])
    rows = [_case(group, by) for _key, group in frame.groupby(key, sort=False)]
    table = pd.DataFrame(rows)
    return table.sort_values(["malignant_prob", by], ascending=[False, True],
                             na_position="last", kind="stable").reset_index(drop=True)


def format_cases(table: pd.DataFrame, by: str, top: int = 10) -> str:
    """The lines ``raysky results --by`` prints: counts, then the ``top`` cases."""
    named = int(table[by].notna().sum())
    alone = len(table) - named
    what = "lesions" if by == "lesion_id" else "patients"
    lines = [f"{named} {what} from {int(table['images'].sum())} images"
             + (f"; {alone} images without a {by}, each on its own" if alone else "")]
    referred, flagged = int(table["refer"].eq(True).sum()), int(table["ood"].eq(True).sum())
    lines.append(f"referred: {referred}  out of distribution: {flagged}  "
                 f"with errors: {int((table['errors'] > 0).sum())}")
    if top and len(table):
        lines.append(f"top {min(top, len(table))} by malignant_prob:")
        for rank, row in enumerate(table.head(top).itertuples(index=False), 1):
            prob = "   n/a" if row.malignant_prob is None or pd.isna(row.malignant_prob) \
                else f"{row.malignant_prob:.4f}"
            refer = {True: "refer", False: "-", None: "?"}.get(row.refer, "?")
            ood = " ood" if row.ood is True else ""
            name = getattr(row, by)
            lines.append(f"  {rank:3d}. {prob}  {refer:5s}{ood}  {row.images:3d} img  "
                         f"{name if name is not None else '(none)'}  top {row.top_image_id}")
    return "\n".join(lines)
