"""Readers of the public dataset layouts: HAM10000, ISIC 2018 (Tasks 1 and 3) and ISIC 2019.

Each follows the rules in :mod:`raysky.data.readers`, which re-exports them.
"""

from __future__ import annotations

import posixpath

from raysky import storage
from raysky.data.metadata import normalize_age
from raysky.data.records import DatasetError, LesionRecord
from raysky.data.tables import (
    MASK_SUFFIX,
    Tree,
    check_unique,
    load_csv,
    missing_image,
    one_hot_label,
    parse_label,
)
from raysky.data.taxonomy import ISIC_COLUMN_NAMES

ISIC2018_SPLITS: tuple[str, ...] = ("Training", "Validation", "Test")

HAM10000_METADATA = "HAM10000_metadata.csv"
HAM10000_IMAGE_DIRS = ("images", "HAM10000_images_part_1", "HAM10000_images_part_2")
HAM10000_MASK_DIRS = ("masks", "HAM10000_segmentations_lesion_tschandl")

ISIC2019_GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
ISIC2019_METADATA = "ISIC_2019_Training_Metadata.csv"
ISIC2019_IMAGE_DIR = "ISIC_2019_Training_Input"


def read_ham10000(root: str) -> list[LesionRecord]:
    """Read the HAM10000 layout (the official release, Kaggle's copy, or raysky's sample).

    Looks for ``<root>/HAM10000_metadata.csv`` (columns ``lesion_id, image_id, dx, age, sex,
    localization``; ``dx_type`` and any other column are ignored). Images are read from
    ``<root>/<dir>/<image_id>.jpg`` with ``<dir>`` one of ``images``,
    ``HAM10000_images_part_1`` or ``HAM10000_images_part_2``. Masks are optional, read from
    ``<root>/<dir>/<image_id>_segmentation.png`` with ``<dir>`` one of ``masks`` or
    ``HAM10000_segmentations_lesion_tschandl``. Records follow the CSV's row order.
    """
    tree = Tree(root)
    table = load_csv(tree.file(HAM10000_METADATA) or storage.join(root, HAM10000_METADATA))
    id_col, lesion_col, dx_col, age_col, sex_col, site_col = (
        table.column(name)
        for name in ("image_id", "lesion_id", "dx", "age", "sex", "localization")
    )
    images = tree.index(HAM10000_IMAGE_DIRS, (".jpg", ".jpeg"))
    masks = tree.index(HAM10000_MASK_DIRS, (MASK_SUFFIX,))
    seen: dict[str, int] = {}
    records = []
    for row, values in table.rows:
        image_id = check_unique(table, seen, values[id_col], row, id_col)
        label = parse_label(table, row, values[dx_col], dx_col)
        if image_id not in images:
            raise missing_image(table, row, image_id, tree, HAM10000_IMAGE_DIRS)
        records.append(LesionRecord(
            image_id=image_id, image_uri=images[image_id], mask_uri=masks.get(image_id),
            label=label, lesion_id=values[lesion_col], age=normalize_age(values[age_col]),
            sex=values[sex_col], site=values[site_col],
        ))
    return records


def _isic2018_split(split: str) -> str:
    for name in ISIC2018_SPLITS:
        if split.lower() == name.lower():
            return name
    raise ValueError(f"unknown ISIC 2018 split {split!r}; expected one of {', '.join(ISIC2018_SPLITS)}")


def read_isic2018(root: str, split: str = "Training") -> list[LesionRecord]:
    """Read ISIC 2018 Task 1 (segmentation), Task 3 (classification), or both, for one split.

    ``split`` is ``Training``, ``Validation`` or ``Test``. Under ``root`` the reader looks for:

    * Task 1 images ``ISIC2018_Task1-2_{split}_Input/<id>.jpg`` and masks
      ``ISIC2018_Task1_{split}_GroundTruth/<id>_segmentation.png``. A mask whose image is
      missing is an error. An image without a mask gets ``mask_uri=None``.
    * Task 3 images ``ISIC2018_Task3_{split}_Input/<id>.jpg`` and labels from the one-hot CSV
      (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``). The CSV is the one file anywhere under
      ``root`` named ``ISIC2018_Task3_{split}_GroundTruth*.csv``; failing that, the one
      ``*.csv`` inside the Task 3 image folder.
    * Optionally ``ISIC2018_Task3_{split}_LesionGroupings.csv`` anywhere under ``root``
      (``image,lesion_id``), which fills ``lesion_id``.

    Both tasks are joined by image id. Every labelled row becomes a record, and so does every
    Task 1 image without a label (its ``label`` is None). A labelled image is looked up in the
    Task 3 folder first, then in the Task 1 folder.
    """
    split = _isic2018_split(split)
    tree = Tree(root)
    task1_dir = f"ISIC2018_Task1-2_{split}_Input"
    task3_dir = f"ISIC2018_Task3_{split}_Input"
    mask_dir = f"ISIC2018_Task1_{split}_GroundTruth"
    task1_images = tree.index([task1_dir], (".jpg", ".jpeg"))
    task3_images = tree.index([task3_dir], (".jpg", ".jpeg"))
    masks = tree.index([mask_dir], (MASK_SUFFIX,))
    for image_id, mask_uri in masks.items():
        if image_id not in task1_images and image_id not in task3_images:
            raise DatasetError(mask_uri, f"mask has no image {task1_dir}/{image_id}.jpg")

    label_csv = _isic2018_label_csv(tree, split, task3_dir)
    if label_csv is None and not task1_images:
        raise DatasetError(
            root, f"no ISIC 2018 {split} data: expected {task1_dir}/ with {mask_dir}/, or "
            f"{task3_dir}/ with ISIC2018_Task3_{split}_GroundTruth.csv"
        )
    lesions = _isic2018_lesion_groups(tree, split)
    records: list[LesionRecord] = []
    if label_csv is not None:
        table = load_csv(label_csv)
        image_col = table.column("image")
        columns = [table.column(name) for name in ISIC_COLUMN_NAMES["isic2018"].values()]
        seen: dict[str, int] = {}
        for row, values in table.rows:
            image_id = check_unique(table, seen, values[image_col], row, image_col)
            label = one_hot_label(table, row, values, columns)
            image_uri = task3_images.get(image_id) or task1_images.get(image_id)
            if image_uri is None:
                raise missing_image(table, row, image_id, tree, [task3_dir, task1_dir])
            records.append(LesionRecord(image_id=image_id, image_uri=image_uri,
                                        mask_uri=masks.get(image_id), label=label,
                                        lesion_id=lesions.get(image_id)))
    labelled = {record.image_id for record in records}
    for image_id, image_uri in sorted(task1_images.items()):
        if image_id not in labelled:
            records.append(LesionRecord(image_id=image_id, image_uri=image_uri,
                                        mask_uri=masks.get(image_id),
                                        lesion_id=lesions.get(image_id)))
    return records


def _isic2018_label_csv(tree: Tree, split: str, task3_dir: str) -> str | None:
    """The split's Task 3 label CSV: the one ``ISIC2018_Task3_{split}_GroundTruth*.csv`` under the
    root, failing that the one ``*.csv`` inside the Task 3 image folder; None when there is none."""
    label_csvs = tree.glob(f"ISIC2018_Task3_{split}_GroundTruth*.csv") or [
        uri for rel, uri in tree.files.items()
        if posixpath.dirname(rel).lower() == task3_dir.lower() and rel.lower().endswith(".csv")
    ]
    if len(label_csvs) > 1:
        raise DatasetError(tree.root, f"several ISIC 2018 {split} label CSVs: "
                                      f"{', '.join(label_csvs)}")
    return label_csvs[0] if label_csvs else None


def _isic2018_lesion_groups(tree: Tree, split: str) -> dict[str, str | None]:
    """Image id to lesion id from the split's optional ``LesionGroupings.csv``."""
    lesions: dict[str, str | None] = {}
    for uri in tree.glob(f"ISIC2018_Task3_{split}_LesionGroupings.csv")[:1]:
        groups = load_csv(uri)
        image_col, lesion_col = groups.column("image"), groups.column("lesion_id")
        seen: dict[str, int] = {}
        for row, values in groups.rows:
            lesions[check_unique(groups, seen, values[image_col], row, image_col)] = (
                values[lesion_col])
    return lesions


def read_isic2019(root: str) -> list[LesionRecord]:
    """Read the ISIC 2019 training set.

    Looks for ``<root>/ISIC_2019_Training_GroundTruth.csv`` (``image`` plus one-hot
    ``MEL,NV,BCC,AK,BKL,DF,VASC,SCC``, and optionally ``UNK``). Exactly one of them must be 1,
    and a row with ``UNK=1`` is an error. Images come from
    ``<root>/ISIC_2019_Training_Input/<image>.jpg``. If
    ``<root>/ISIC_2019_Training_Metadata.csv`` is there (``image, age_approx,
    anatom_site_general, sex``, and optionally ``lesion_id``), its rows are joined by image
    id. Ground-truth images without a metadata row keep None fields.
    """
    tree = Tree(root)
    table = load_csv(tree.file(ISIC2019_GROUND_TRUTH) or storage.join(root, ISIC2019_GROUND_TRUTH))
    image_col = table.column("image")
    columns = [table.column(name) for name in ISIC_COLUMN_NAMES["isic2019"].values()]
    unknown_col = table.column("UNK", required=False)
    images = tree.index([ISIC2019_IMAGE_DIR], (".jpg", ".jpeg"))

    metadata: dict[str, dict[str, str | None]] = {}
    metadata_uri = tree.file(ISIC2019_METADATA)
    if metadata_uri is not None:
        meta = load_csv(metadata_uri)
        meta_id, age_col, site_col, sex_col = (
            meta.column(name) for name in ("image", "age_approx", "anatom_site_general", "sex"))
        lesion_col = meta.column("lesion_id", required=False)
        seen: dict[str, int] = {}
        for row, values in meta.rows:
            metadata[check_unique(meta, seen, values[meta_id], row, meta_id)] = {
                "age": values[age_col], "site": values[site_col], "sex": values[sex_col],
                "lesion_id": values[lesion_col] if lesion_col else None,
            }

    seen = {}
    records = []
    for row, values in table.rows:
        image_id = check_unique(table, seen, values[image_col], row, image_col)
        label = one_hot_label(table, row, values, columns, reject=unknown_col)
        if image_id not in images:
            raise missing_image(table, row, image_id, tree, [ISIC2019_IMAGE_DIR])
        extra = metadata.get(image_id, {})
        records.append(LesionRecord(
            image_id=image_id, image_uri=images[image_id], label=label,
            lesion_id=extra.get("lesion_id"), age=normalize_age(extra.get("age")),
            sex=extra.get("sex"), site=extra.get("site"),
        ))
    return records

