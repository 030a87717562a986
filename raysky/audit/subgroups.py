"""Subgroup audit: how well the model does for whom, each figure with a bootstrap interval.

The input is one table of scored images with their ground truth: what
:func:`raysky.results.ground_truth.join_ground_truth` returns (``label`` per row), with the patients'
metadata beside it (:func:`audit_table` builds it from results and dataset records). The
standard groupings are sex, age band, anatomical site and skin tone (from a ``skin_tone`` or
``ita_deg`` column, where the results carry one); ``by`` adds any other column. Per group: n,
malignant n, balanced accuracy, malignant AUC and the sensitivity and specificity of the
referral decisions (the table's ``refer`` column where every row has one, else
``malignant_prob >= threshold``), each with a 95% interval by lesion where lesion ids exist:
Wilson on the lesion-clustered effective count for the two rates, a seeded lesion bootstrap
for the others (see :mod:`raysky.metrics.intervals` for why). Groups with fewer than 10
malignant or 10 benign images are marked ``too_few``, and are neither ranked nor flagged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from raysky.data.ids import normalize_id
from raysky.data.records import LesionRecord
from raysky.data.skin_tone import skin_tone_category
from raysky.data.taxonomy import MALIGNANT_CLASSES
from raysky.metrics.intervals import (
    DEFAULT_LEVEL,
    DEFAULT_REPLICATES,
    bootstrap_intervals,
    count_clusters,
    format_interval,
    group_rows,
    proportion_interval,
)
from raysky.metrics.isic import balanced_accuracy, rank_auc
from raysky.results.columns import result_classes
from raysky.results.ground_truth import join_ground_truth

MIN_PER_CLASS = 10
"""Fewer malignant or fewer benign images than this: too few to judge a group."""

UNKNOWN = "unknown"
AGE_BANDS: tuple[tuple[float, str], ...] = ((30, "<30"), (50, "30-49"), (70, "50-69"),
                                            (math.inf, "70+"))
"""Upper bound (exclusive) and name of each age band."""
STANDARD = {"sex": ("sex",), "age_band": ("age",),
            "site": ("site", "localization", "anatom_site_general"),
            "skin_tone": ("skin_tone", "ita_deg")}
"""Each standard grouping and the columns it can come from, in order of preference."""


def too_few(is_malignant: np.ndarray, minimum: int = MIN_PER_CLASS) -> bool:
    """True when ``is_malignant`` (booleans) holds fewer than ``minimum`` malignant or benign."""
    truth = np.asarray(is_malignant, dtype=bool)
    return bool(truth.sum() < minimum or (~truth).sum() < minimum)


def age_band(age: object) -> str:
    """The band of an age in years (<30, 30-49, 50-69, 70+), ``unknown`` when missing."""
    try:
        value = float(age)
    except (TypeError, ValueError):
        return UNKNOWN
    if math.isnan(value):
        return UNKNOWN
    return next(name for upper, name in AGE_BANDS if value < upper)


def audit_table(results: pd.DataFrame, records: Sequence[LesionRecord]) -> pd.DataFrame:
    """Results joined to ground truth by :func:`raysky.results.ground_truth.join_ground_truth`, plus each
    record's ``lesion_id``, ``age``, ``sex`` and ``site`` (the results' own where the record
    has none)."""
    # The id rule join_ground_truth applies to records (an image suffix dropped), so the
    # metadata lands on the rows it joined.
    joined, _coverage = join_ground_truth(results, records)
    fields = ("lesion_id", "age", "sex", "site")
    meta = pd.DataFrame({"image_id": [normalize_id(r.image_id) for r in records],
                         **{f: [getattr(r, f) for r in records] for f in fields}})
    table = joined.merge(meta.drop_duplicates("image_id"), on="image_id", how="left",
                         suffixes=("", "_record"))
    for name in fields:
        # Results since issue 24 carry the metadata they were scored with; the dataset's own
        # record wins where it has a value, and the results fill the rest.
        if f"{name}_record" in table.columns:
            record = table.pop(f"{name}_record")
            table[name] = record.where(record.notna(), table[name])
    return table


def _group_column(table: pd.DataFrame, name: str) -> tuple[pd.Series | None, str | None]:
    """The group label per row of one grouping, and the column it came from."""
    for column in STANDARD.get(name, (name,)):
        # A column with no value at all (results scored before raysky measured skin tone,
        # read back as null) groups nothing: it is as absent as a missing one.
        if column not in table.columns or table[column].isna().all():
            continue
        values = table[column]
        if column == "age":
            return values.map(age_band), column
        if column == "ita_deg":
            return values.map(lambda v: skin_tone_category(None if pd.isna(v) else float(v))
                              ).fillna(UNKNOWN), column
        return values.map(lambda v: UNKNOWN if pd.isna(v) or str(v).strip() == ""
                          else str(v).strip()), column
    return None, None


# The bootstrapped metrics over (class index, probabilities, malignant, malignant_prob).
_BOOTSTRAPPED = {
    "balanced_accuracy": lambda y, p, t, s: balanced_accuracy(y, p),
    "malignant_auc": lambda y, p, t, s: rank_auc(t, s),
}


def _reasons(malignant: int, benign: int, decided: bool) -> dict[str, str]:
    reasons = {}
    if malignant == 0 or benign == 0:
        reasons["malignant_auc"] = "no malignant images" if malignant == 0 else "no benign images"
    if not decided:
        reasons["sensitivity"] = reasons["specificity"] = "no referral threshold given"
    else:
        if malignant == 0:
            reasons["sensitivity"] = "no malignant images"
        if benign == 0:
            reasons["specificity"] = "no benign images"
    return reasons


def _evaluate(rows: pd.DataFrame, arrays: tuple, referred: np.ndarray | None, clusters,
              replicates: int, seed: int, minimum: int) -> dict:
    truth = arrays[2]
    malignant, benign = int(truth.sum()), int((~truth).sum())
    out = {"n": len(rows), "malignant_n": malignant, "benign_n": benign,
           "too_few": bool(malignant < minimum or benign < minimum)}
    # A perfect AUC leaves every replicate at 1.0; its interval then stands on the lesions of
    # the smaller class, the units a perfect ranking was shown on.
    units = min(count_clusters(clusters, truth), count_clusters(clusters, ~truth)) \
        if len(truth) else 0
    classes = [count_clusters(clusters, arrays[0] == c) for c in np.unique(arrays[0])]
    out.update(bootstrap_intervals(_BOOTSTRAPPED, *arrays, clusters=clusters,
                                   replicates=replicates, seed=seed,
                                   collapse_n={"malignant_auc": units,
                                               "balanced_accuracy": min(classes, default=0)}))
    if referred is not None:
        def part(mask):
            return None if clusters is None else clusters[mask]

        out["sensitivity"] = proportion_interval(referred[truth], part(truth))
        out["specificity"] = proportion_interval(~referred[~truth], part(~truth))
    for name, reason in _reasons(malignant, benign, referred is not None).items():
        out[name] = {**out.get(name, {"value": None, "low": None, "high": None}), "reason": reason}
    return out


def _referred(rows: pd.DataFrame, threshold: float | None) -> np.ndarray | None:
    """The referral decision per row: the ``refer`` column where every row has one, else the
    referral rule at ``threshold`` (the threshold itself refers), else None."""
    if len(rows) and "refer" in rows.columns and rows["refer"].notna().all():
        return rows["refer"].astype(bool).to_numpy()
    if threshold is None:
        return None
    return rows["malignant_prob"].to_numpy(np.float64) >= threshold


def subgroup_audit(table: pd.DataFrame, by: Sequence[str] = (), threshold: float | None = None,
                   seed: int = 0, replicates: int = DEFAULT_REPLICATES,
                   min_per_class: int = MIN_PER_CLASS, standard: bool = True) -> dict:
    """Per-group performance with 95% intervals (see the module docstring).

    ``table`` needs ``label``, ``malignant_prob`` and the ``prob_<class>`` columns; rows whose
    ``status`` is not ``ok`` or that have no label are left out. Sensitivity and specificity
    measure the ``refer`` column where every such row has one, else ``malignant_prob >=
    threshold``, and are absent (with a reason) without either. ``by`` names extra columns
    (an unknown name is a ``ValueError`` listing the columns there are). Returns ``overall``
    and, per grouping, its ``column`` and ``groups``; each group carries ``flagged`` (its
    sensitivity interval lies wholly below the overall sensitivity) and ``rank`` (by malignant
    AUC, 1 best; None when ``too_few``). A standard grouping whose columns are absent is listed
    under ``unavailable`` with the reason.
    """
    rows = _audited_rows(table, by)
    classes = result_classes(rows)
    index = {c: i for i, c in enumerate(classes)}
    # A label the model does not predict can never be recalled: an index no argmax returns.
    arrays = (rows["label"].map(lambda v: index.get(v, -2)).to_numpy(np.int64),
              rows[[f"prob_{c}" for c in classes]].to_numpy(np.float64),
              rows["label"].isin(MALIGNANT_CLASSES).to_numpy(bool),
              rows["malignant_prob"].to_numpy(np.float64))
    lesions = rows["lesion_id"] if "lesion_id" in rows.columns else None
    lesions = None if lesions is None or lesions.isna().all() else lesions.to_numpy(object)
    referred = _referred(rows, threshold)

    def run(mask: np.ndarray | None) -> dict:
        part = tuple(a[mask] for a in arrays) if mask is not None else arrays
        chosen = rows[mask] if mask is not None else rows
        clusters = None if lesions is None else (lesions[mask] if mask is not None else lesions)
        decisions = None if referred is None else (referred[mask] if mask is not None
                                                   else referred)
        return _evaluate(chosen, part, decisions, clusters, replicates, seed, min_per_class)

    overall = run(None)
    out = {"n": len(rows), "threshold": threshold, "seed": seed, "replicates": replicates,
           "level": DEFAULT_LEVEL, "min_per_class": min_per_class,
           "intervals": "wilson (sensitivity, specificity), bootstrap (others)",
           "resampled_by": "lesion_id" if lesions is not None else "image",
           "overall": overall, "groupings": {}, "unavailable": {}}
    names = [*(STANDARD if standard else ()), *(b for b in by if b not in STANDARD or not standard)]
    for name in dict.fromkeys(names):
        labels, column = _group_column(rows, name)
        if labels is None:
            out["unavailable"][name] = f"no {' or '.join(STANDARD[name])} values"
            continue
        order = {band: i for i, (_upper, band) in enumerate(AGE_BANDS)}
        groups = [{"group": value, **run((labels == value).to_numpy())}
                  for value in sorted(labels.unique(),
                                      key=lambda v: (v == UNKNOWN, order.get(v, 0), v))]
        _flag_and_rank(groups, overall)
        out["groupings"][name] = {"column": column, "groups": groups}
    return out


def _audited_rows(table: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """The labelled, ``ok`` rows of ``table``, after checking it has what the audit needs."""
    unknown = [name for name in by if name not in table.columns and name not in STANDARD]
    if unknown:
        raise ValueError(f"no column {', '.join(map(repr, unknown))} to group by; the table has "
                         f"{', '.join(map(str, table.columns))}")
    missing = [c for c in ("label", "malignant_prob") if c not in table.columns]
    if missing:
        raise ValueError(f"the audit table lacks {', '.join(missing)} (join results to ground "
                         "truth first: raysky.audit.subgroups.audit_table)")
    rows = table[table["label"].notna()]
    if "status" in rows.columns:
        rows = rows[rows["status"] == "ok"]
    return rows.reset_index(drop=True)


def _flag_and_rank(groups: list[dict], overall: dict) -> None:
    """Set each group's ``flagged`` (its sensitivity interval lies wholly below the overall
    sensitivity) and ``rank`` (by malignant AUC, 1 best; None for ``too_few``), in place."""
    overall_sens = overall.get("sensitivity", {}).get("value")
    for group in groups:
        high = group.get("sensitivity", {}).get("high")
        group["flagged"] = bool(not group["too_few"] and high is not None
                                and overall_sens is not None and high < overall_sens)
    ranked = sorted((g for g in groups if not g["too_few"] and g["malignant_auc"]["value"]
                     is not None), key=lambda g: -g["malignant_auc"]["value"])
    for group in groups:
        group["rank"] = next((i for i, r in enumerate(ranked, 1) if r is group), None)


def format_subgroups(audit: dict) -> str:
    """:func:`subgroup_audit`'s output as a plain-text table, one line per group."""
    keys = ("balanced_accuracy", "malignant_auc", "sensitivity", "specificity")
    head = f"{'group':<28}{'n':>6}{'mal':>5}  " + "".join(f"{k:<22}" for k in keys) + "notes"
    lines = [f"by {audit['resampled_by']}: Wilson intervals for sensitivity and specificity, "
             f"{audit['replicates']} bootstrap replicates for the others; threshold "
             f"{audit['threshold']}", head]

    def line(name: str, g: dict) -> str:
        notes = [n for n, on in (("too few", g["too_few"]), ("FLAGGED", g.get("flagged"))) if on]
        return (f"{name[:27]:<28}{g['n']:>6}{g['malignant_n']:>5}  "
                + "".join(f"{format_interval(g.get(k)):<22}" for k in keys) + ", ".join(notes))

    lines += [line(name, g) for name, g in group_rows(audit, separator="=")]
    for grouping, reason in audit["unavailable"].items():
        lines.append(f"{grouping}: not available ({reason})")
    return "\n".join(lines)
