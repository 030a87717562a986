"""Encoding of patient metadata (age, sex, anatomical site) into model inputs.

The vocabulary is fixed and stored in every classifier checkpoint, so a model always decodes
metadata the way it was trained. Missing, empty, NaN and unseen values all map to an explicit
unknown token; nothing here raises on bad metadata, because a screening job must score an image
whose metadata row is incomplete.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

UNKNOWN = "unknown"

SEX_VOCAB: tuple[str, ...] = (UNKNOWN, "male", "female")

# One site vocabulary that both HAM10000 ``localization`` and ISIC 2019
# ``anatom_site_general`` fold into. ISIC's coarser regions set the granularity, because a
# finer HAM site can always be coarsened but not the other way round.
SITE_VOCAB: tuple[str, ...] = (
    UNKNOWN,
    "head_neck",
    "upper_extremity",
    "lower_extremity",
    "anterior_torso",
    "posterior_torso",
    "lateral_torso",
    "torso",
    "palms_soles",
    "oral_genital",
)

_SITE_ALIASES: dict[str, str] = {
    # HAM10000 localization
    "face": "head_neck",
    "ear": "head_neck",
    "scalp": "head_neck",
    "neck": "head_neck",
    "upper extremity": "upper_extremity",
    "hand": "upper_extremity",
    "lower extremity": "lower_extremity",
    "foot": "lower_extremity",
    "chest": "anterior_torso",
    "abdomen": "anterior_torso",
    "back": "posterior_torso",
    "trunk": "torso",
    "acral": "palms_soles",
    "genital": "oral_genital",
    # ISIC 2019 anatom_site_general
    "head/neck": "head_neck",
    "anterior torso": "anterior_torso",
    "posterior torso": "posterior_torso",
    "lateral torso": "lateral_torso",
    "palms/soles": "palms_soles",
    "oral/genital": "oral_genital",
} | {site: site for site in SITE_VOCAB}


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "null", UNKNOWN)


SEX_ALIASES: dict[str, str] = {"m": "male", "f": "female"}
SEX_SPELLINGS: tuple[str, ...] = (*SEX_VOCAB[1:], *SEX_ALIASES, UNKNOWN)
"""Every sex value read as known (or as explicitly unknown), case-insensitively."""
MAX_AGE_YEARS = 120.0


def normalize_sex(value: object) -> str:
    """Fold any sex value to ``male``, ``female`` or ``unknown``."""
    if _is_missing(value):
        return UNKNOWN
    key = str(value).strip().lower()
    key = SEX_ALIASES.get(key, key)
    return key if key in SEX_VOCAB else UNKNOWN


def normalize_site(value: object) -> str:
    """Fold a HAM10000 or ISIC 2019 anatomical site into raysky's site vocabulary."""
    if _is_missing(value):
        return UNKNOWN
    key = str(value).strip().lower().replace("_", " ")
    return _SITE_ALIASES.get(key, _SITE_ALIASES.get(key.replace(" ", "_"), UNKNOWN))


def normalize_age(value: object) -> float | None:
    """Parse an age in years; missing, non-numeric or implausible values become ``None``."""
    if _is_missing(value):
        return None
    try:
        age = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if math.isnan(age) or not 0.0 <= age <= MAX_AGE_YEARS:
        return None
    return age


@dataclass(frozen=True)
class MetadataVocab:
    """The metadata encoding a classifier was trained with; stored in its checkpoint."""

    sex: tuple[str, ...] = SEX_VOCAB
    site: tuple[str, ...] = SITE_VOCAB
    age_mean: float = 50.0
    age_std: float = 20.0
    fields: tuple[str, ...] = field(default=("age", "sex", "site"))

    def to_dict(self) -> dict:
        """JSON-ready form for checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MetadataVocab:
        """Inverse of :meth:`to_dict`."""
        return cls(
            sex=tuple(data["sex"]),
            site=tuple(data["site"]),
            age_mean=float(data["age_mean"]),
            age_std=float(data["age_std"]),
            fields=tuple(data.get("fields", ("age", "sex", "site"))),
        )

    def encode(self, age: object, sex: object, site: object) -> tuple[float, float, int, int]:
        """Encode one patient as ``(age_z, age_missing, sex_index, site_index)``."""
        age_years = normalize_age(age)
        sex_code = normalize_sex(sex)
        site_code = normalize_site(site)
        sex_index = self.sex.index(sex_code) if sex_code in self.sex else 0
        site_index = self.site.index(site_code) if site_code in self.site else 0
        if age_years is None:
            return 0.0, 1.0, sex_index, site_index
        return (age_years - self.age_mean) / self.age_std, 0.0, sex_index, site_index

    def encode_batch(self, ages: list, sexes: list, sites: list) -> EncodedMetadata:
        """Encode a batch of patients as the numpy arrays of :class:`EncodedMetadata`.

        The arrays stay torch-free so that readers and the CLI need no torch;
        :func:`raysky.models.preprocess.metadata_to_tensors` makes the classifier's input.
        """
        rows = [self.encode(a, s, t) for a, s, t in zip(ages, sexes, sites, strict=True)]
        return EncodedMetadata(age=[[r[0], r[1]] for r in rows], sex=[r[2] for r in rows],
                               site=[r[3] for r in rows])


@dataclass(frozen=True)
class EncodedMetadata:
    """A batch of encoded patients: ``age`` float32 ``[B, 2]`` (normalised age, missing
    flag), ``sex`` and ``site`` int64 ``[B]`` vocabulary indices.

    Any array-like is accepted and coerced, so a training batch's columns and
    :meth:`MetadataVocab.encode_batch` rows end up with the same dtypes and shapes.
    """

    age: np.ndarray
    sex: np.ndarray
    site: np.ndarray

    def __post_init__(self) -> None:
        # The dataclass is frozen, so coercion has to go around its __setattr__.
        object.__setattr__(self, "age", np.asarray(self.age, dtype=np.float32).reshape(-1, 2))
        object.__setattr__(self, "sex", np.asarray(self.sex, dtype=np.int64).reshape(-1))
        object.__setattr__(self, "site", np.asarray(self.site, dtype=np.int64).reshape(-1))
        if not len(self.age) == len(self.sex) == len(self.site):
            raise ValueError(f"metadata arrays differ in length: age {len(self.age)}, "
                             f"sex {len(self.sex)}, site {len(self.site)}")

    def __len__(self) -> int:
        return len(self.sex)
