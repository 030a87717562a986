"""Image ids for listed inputs: unique whatever the folder layout, stable, safe as file names.

Ids name results rows, exported masks (``<id>_segmentation.png``) and training masks, so every
id passes :func:`raysky.storage.name_problem` as one path component. :func:`assign_ids` gives
each input of a listing (an archive prefix or a manifest) its id:

1. its **name id**, :func:`archive_image_id` of its own file name (``ISIC_0024306.jpg`` is
   ``ISIC_0024306``), when no other input of the listing has the same name id: today's ids,
   so existing outputs and ISIC exports stay valid;
2. else its **path id**: the path relative to the listing's root with every ``/`` written as
   ``~`` (``clinic-a/IMG_0001.jpg`` is ``clinic-a~IMG_0001``), the last part following the
   name rule;
3. else, when that is taken, too long or has a folder name that is not safe, the name id
   followed by ``~`` and 10 hex digits of the SHA-256 of the relative path.

An input whose own file name is not safe (``'``, ``[``, ``;``, ``:`` ...) has no id it could be
scored under; it gets a stand-in id (the name with each unsafe character written ``_``, ``~``
and the hash) and a ``problem`` that scoring turns into its error row.

Two other rules read ids, and both are here so the three can be read side by side. The name
rule above looks at one file and strips only a lowercase ``.jpg`` (so no two files of one
folder share an id). :func:`strip_image_suffix` drops any one image suffix (``.jpg``,
``.jpeg``, ``.png``, any case): a metadata CSV's key ``x.png`` or ``x`` names the image ``x.png``.
:func:`normalize_id` is that rule on an id with its whitespace stripped, the way ISIC's own
scorer matches predictions to ground truth: results and ground truth are joined on it.

``kept`` maps source URIs to the ids an output already holds for them, and those win: a
rerun into the same output keeps every earlier id, even when a folder has since gained a file
of the same name (the newcomer takes the path id instead), and no new input is given an id
that a kept one holds.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from raysky import storage
from raysky.data.tables import IMAGE_SUFFIXES

PATH_SEPARATOR = "~"
"""Stands for ``/`` in path ids; safe in a file name, a URI and an S3 key."""
HASH_DIGITS = 10
_UNSAFE_CHARACTER = re.compile(r"[^\w .\-+=@,()~#&!%]")
_STAND_IN_CHARS = 120


def strip_image_suffix(name: str) -> str:
    """``name`` without one trailing image suffix (any case), or ``name`` when it has none."""
    stem, ext = posixpath.splitext(name)
    return stem if ext.lower() in IMAGE_SUFFIXES and stem else name


def normalize_id(image_id: object) -> str:
    """``image_id`` as results and ground truth are matched on: stripped of whitespace and of
    one image suffix (``.jpg``, ``.jpeg``, ``.png``, any case), since ISIC's own scorer accepts
    ids with one."""
    return strip_image_suffix(str(image_id).strip())


def suffixed_ids(image_ids: Iterable[str]) -> list[str]:
    """Every spelling :func:`normalize_id` folds onto each of ``image_ids``: the id itself and
    the id with each image suffix, lower and upper case (to find stored rows by matched id)."""
    suffixes = (*IMAGE_SUFFIXES, *(s.upper() for s in IMAGE_SUFFIXES))
    ids = list(image_ids)
    return [*ids, *(f"{i}{suffix}" for i in ids for suffix in suffixes)]


def archive_image_id(name: str) -> str:
    """The name id of a file called ``name`` (its base name, no directory).

    The id is the name without a final lowercase ``.jpg`` (the dermoscopy archives' own
    extension: ``ISIC_0024306.jpg`` is ``ISIC_0024306``), and the whole name otherwise
    (``x.png``, ``x.JPG``, ``x.jpeg``, ``x.jpg.png``, ``x.png.jpg``, ``x.dcm``). The rule looks
    at this one file only, so no two names in one folder share an id: ids that end in an image
    suffix are whole names, and the others are ``.jpg`` names whose stem has no image suffix.
    """
    name = posixpath.basename(name)
    if name.endswith(".jpg") and strip_image_suffix(name[:-4]) == name[:-4]:
        return name[:-4]
    return name


def path_hash(rel: str) -> str:
    """The first :data:`HASH_DIGITS` hex digits of the SHA-256 of ``rel``."""
    return hashlib.sha256(rel.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_DIGITS]


def path_image_id(rel: str) -> str | None:
    """``rel`` with ``/`` written as ``~`` and the name rule on its last part; None when a
    part is not safe or the result is too long to be one file name."""
    parts = rel.strip("/").split("/")
    parts[-1] = archive_image_id(parts[-1])
    if any(storage.name_problem(part, nested=False) for part in parts):
        return None
    candidate = PATH_SEPARATOR.join(parts)
    return None if storage.name_problem(candidate, nested=False) else candidate


def hashed_image_id(name_id: str, rel: str) -> str:
    """``<name id>~<hash of rel>``, the name cut so that the whole stays one safe file name."""
    room = storage.MAX_NAME_CHARS - HASH_DIGITS - len(PATH_SEPARATOR)
    return f"{name_id[:room]}{PATH_SEPARATOR}{path_hash(rel)}"


def stand_in_id(rel: str) -> str:
    """A safe id for an input whose own name is not safe: its name with every unsafe
    character written ``_``, then ``~`` and the hash of ``rel`` (unique, and stable for that
    path), so its error row can be stored and found again."""
    name = _UNSAFE_CHARACTER.sub("_", posixpath.basename(rel)).lstrip(".")[:_STAND_IN_CHARS]
    return f"{name or 'unnamed'}{PATH_SEPARATOR}{path_hash(rel)}"


KeptIds = Mapping[str, str] | Callable[[Sequence[str]], Mapping[str, str]]
"""Ids an output already holds, by source URI: a mapping, or a function that returns one for
the listed URIs (so an output is only searched for what is listed)."""


@dataclass(frozen=True)
class AssignedId:
    """One input's id, and why it cannot be scored under its own name (None when it can)."""

    image_id: str
    problem: str | None = None


def assign_ids(rels: Sequence[str], uris: Sequence[str] | None = None,
               kept: KeptIds | None = None,
               reserved: Iterable[str] = ()) -> list[AssignedId]:
    """The id of each input ``rels[i]`` (its path below the listing's root), by the rules of
    this module; ``uris[i]`` is its source URI, matched against ``kept`` (source URI -> id
    already in the output). Unique across the listing, ``kept``'s ids of its inputs and
    ``reserved`` (ids given otherwise, such as a manifest's own), and the same for the same
    listing, ``kept`` and ``reserved``."""
    uris = uris if uris is not None else rels
    kept = (kept(uris) if callable(kept) else kept) or {}
    out: list[AssignedId | None] = [None] * len(rels)
    taken: set[str] = set(reserved)
    for i, uri in enumerate(uris):
        if uri in kept:
            out[i] = AssignedId(kept[uri])
            taken.add(kept[uri])
    name_ids = [archive_image_id(rel) for rel in rels]
    problems = [storage.name_problem(name_id, nested=False) for name_id in name_ids]
    counts = Counter(name_id for name_id, problem in zip(name_ids, problems, strict=True)
                     if not problem)
    # Unique name ids first, so a path id never pushes an input off its own name.
    for i, name_id in enumerate(name_ids):
        if out[i] is None and not problems[i] and counts[name_id] == 1 and name_id not in taken:
            out[i] = AssignedId(name_id)
            taken.add(name_id)
    for i in sorted(range(len(rels)), key=rels.__getitem__):
        if out[i] is not None:
            continue
        if problems[i]:
            out[i] = AssignedId(_unused(stand_in_id(rels[i]), taken),
                                f"unsafe file name for an image id: it {problems[i]}")
        else:
            candidate = path_image_id(rels[i]) if counts[name_ids[i]] > 1 else None
            if candidate is None or candidate in taken:
                candidate = _unused(hashed_image_id(name_ids[i], rels[i]), taken)
            out[i] = AssignedId(candidate)
        taken.add(out[i].image_id)
    return out  # type: ignore[return-value]


def _unused(candidate: str, taken: set[str]) -> str:
    """``candidate``, or it with a counter when an identical path was listed twice."""
    n = 2
    unique = candidate
    while unique in taken:
        unique = f"{candidate[:storage.MAX_NAME_CHARS - 8]}{PATH_SEPARATOR}{n}"
        n += 1
    return unique
