"""The canonical diagnosis taxonomy shared by every dataset layout.

HAM10000 uses lowercase ``dx`` codes, ISIC 2018 Task 3 and ISIC 2019 use one-hot columns with
upper-case names, and ISIC 2019 renamed AKIEC to AK. raysky maps all of them onto one list of
lowercase codes, in ISIC's column order, so a model trained on one layout can be scored and
exported in another.
"""

from __future__ import annotations

CANONICAL_CLASSES: tuple[str, ...] = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc", "scc")
"""Every diagnosis raysky knows, in ISIC 2019 column order (UNK is not a trainable class)."""

HAM10000_CLASSES: tuple[str, ...] = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")
ISIC2018_CLASSES: tuple[str, ...] = HAM10000_CLASSES
ISIC2019_CLASSES: tuple[str, ...] = CANONICAL_CLASSES

MALIGNANT_CLASSES: frozenset[str] = frozenset({"mel", "bcc", "akiec", "scc"})
"""Classes whose probabilities add up to ``malignant_prob``: melanoma and the carcinomas."""

CLASS_DESCRIPTIONS: dict[str, str] = {
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "bcc": "basal cell carcinoma",
    "akiec": "actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "vasc": "vascular lesion",
    "scc": "squamous cell carcinoma",
}

# Every spelling seen in the public layouts, folded to lowercase before lookup.
_ALIASES: dict[str, str] = {code: code for code in CANONICAL_CLASSES} | {
    "ak": "akiec",
    "bowen": "akiec",
    "melanoma": "mel",
    "nevus": "nv",
}

# Column names used by the official ISIC CSVs, per challenge year.
ISIC_COLUMN_NAMES: dict[str, dict[str, str]] = {
    "isic2018": {"mel": "MEL", "nv": "NV", "bcc": "BCC", "akiec": "AKIEC", "bkl": "BKL",
                 "df": "DF", "vasc": "VASC"},
    "isic2019": {"mel": "MEL", "nv": "NV", "bcc": "BCC", "akiec": "AK", "bkl": "BKL",
                 "df": "DF", "vasc": "VASC", "scc": "SCC"},
}


def canonical_label(value: str) -> str:
    """Map any known spelling of a diagnosis (``AK``, ``AKIEC``, ``akiec`` ...) to its code.

    Raises ``ValueError`` naming the value and the accepted codes when it is not a diagnosis.
    """
    key = str(value).strip().lower()
    if key not in _ALIASES:
        raise ValueError(
            f"unknown diagnosis label {value!r}; expected one of {', '.join(CANONICAL_CLASSES)}"
            " (ISIC's AK is accepted as akiec)"
        )
    return _ALIASES[key]


def order_classes(labels: set[str] | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Return the given canonical codes in canonical order, so class indices are stable."""
    wanted = {canonical_label(label) for label in labels}
    return tuple(code for code in CANONICAL_CLASSES if code in wanted)


def malignant_indices(classes: tuple[str, ...] | list[str]) -> list[int]:
    """Indices of the malignant classes within a model's class list."""
    return [i for i, code in enumerate(classes) if code in MALIGNANT_CLASSES]
