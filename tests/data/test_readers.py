"""Dataset readers on the bundled HAM10000 sample, hand-built ISIC layouts, archives and S3."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from raysky.data import (
    CANONICAL_CLASSES,
    FORMATS,
    DatasetError,
    LesionRecord,
    MetadataVocab,
    class_counts,
    read_archive,
    read_dataset,
    read_ham10000,
    read_isic2018,
    read_isic2019,
    records_to_frame,
)
from raysky.data.ids import archive_image_id
from raysky.data.records import RECORD_FIELDS
from raysky.data.taxonomy import HAM10000_CLASSES, ISIC_COLUMN_NAMES
from raysky.storage import upload_directory

HAM_CSV = "HAM10000_metadata.csv"


def _sample_rows(sample_dir: Path) -> list[dict[str, str]]:
    with open(sample_dir / HAM_CSV, newline="") as handle:
        return list(csv.DictReader(handle))


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _without_uris(records: list[LesionRecord]) -> list[tuple]:
    return [(r.image_id, r.label, r.lesion_id, r.age, r.sex, r.site) for r in records]


def _by_id(records: list[LesionRecord]) -> dict[str, LesionRecord]:
    return {record.image_id: record for record in records}


def _one_per_class(sample_dir: Path) -> list[dict[str, str]]:
    """One sample row per HAM10000 class, in canonical class order."""
    first: dict[str, dict[str, str]] = {}
    for row in _sample_rows(sample_dir):
        first.setdefault(row["dx"], row)
    return [first[code] for code in HAM10000_CLASSES]


def _copy_image(sample_dir: Path, image_id: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sample_dir / "images" / f"{image_id}.jpg", target)


def _copy_mask(sample_dir: Path, image_id: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sample_dir / "masks" / f"{image_id}_segmentation.png", target)


# ------------------------------------------------------------------ HAM10000


def test_ham10000_sample(sample_dir):
    records = read_ham10000(str(sample_dir))
    assert len(records) == 35
    assert class_counts(records) == {code: 5 for code in HAM10000_CLASSES}
    assert list(class_counts(records)) == [c for c in CANONICAL_CLASSES if c != "scc"]
    rows = _sample_rows(sample_dir)
    assert [r.image_id for r in records] == [row["image_id"] for row in rows]
    for record, row in zip(records, rows, strict=True):
        assert Path(record.image_uri) == sample_dir / "images" / f"{row['image_id']}.jpg"
        assert Path(record.mask_uri) == sample_dir / "masks" / f"{row['image_id']}_segmentation.png"
        assert record.label == row["dx"]
        assert record.lesion_id == row["lesion_id"]
        assert record.age == float(row["age"])
        assert record.sex == row["sex"]
        assert record.site == row["localization"]
    assert read_dataset(str(sample_dir), "HAM10000") == records


def test_ham10000_official_folders(tmp_path, sample_dir):
    root = tmp_path / "ham"
    root.mkdir()
    shutil.copyfile(sample_dir / HAM_CSV, root / HAM_CSV)
    rows = _sample_rows(sample_dir)
    for i, row in enumerate(rows):
        part = "HAM10000_images_part_1" if i % 2 else "HAM10000_images_part_2"
        _copy_image(sample_dir, row["image_id"], root / part / f"{row['image_id']}.jpg")
        if i < 30:  # the last five have no mask
            name = f"{row['image_id']}_segmentation.png"
            _copy_mask(sample_dir, row["image_id"],
                       root / "HAM10000_segmentations_lesion_tschandl" / name)
    records = read_ham10000(str(root))
    assert _without_uris(records) == _without_uris(read_ham10000(str(sample_dir)))
    assert all("HAM10000_images_part_" in r.image_uri for r in records)
    assert all(r.mask_uri is not None for r in records[:30])
    assert all(r.mask_uri is None for r in records[30:])


def test_ham10000_on_s3(s3, sample_dir):
    bucket = s3.create_bucket("raysky-readers-ham")
    assert upload_directory(str(sample_dir), f"{bucket}/sample") >= 71
    records = read_dataset(f"{bucket}/sample/", "ham10000")
    assert _without_uris(records) == _without_uris(read_ham10000(str(sample_dir)))
    for record in records:
        assert record.image_uri == f"{bucket}/sample/images/{record.image_id}.jpg"
        assert record.mask_uri == f"{bucket}/sample/masks/{record.image_id}_segmentation.png"
    archive = read_archive(f"{bucket}/sample")
    assert sorted(r.image_id for r in archive) == sorted(r.image_id for r in records)


def test_missing_and_unknown_metadata_encode_as_unknown(sample_copy):
    rows = _sample_rows(sample_copy)
    header = list(rows[0])
    rows[0].update(age="", sex="unknown", localization="")
    rows[1].update(age="NaN", sex="", localization="unknown")
    rows[2].update(age="abc", sex="M", localization="elbow of the moon")
    _write_csv(sample_copy / HAM_CSV, header, [[row[c] for c in header] for row in rows])
    records = read_ham10000(str(sample_copy))
    first, second, third = records[:3]
    assert (first.age, first.sex, first.site) == (None, "unknown", None)
    assert (second.age, second.sex, second.site) == (None, None, "unknown")
    assert (third.age, third.sex, third.site) == (None, "M", "elbow of the moon")
    vocab = MetadataVocab()
    for record in (first, second):
        assert vocab.encode(record.age, record.sex, record.site) == (0.0, 1.0, 0, 0)
    assert vocab.encode(third.age, third.sex, third.site) == (0.0, 1.0, 1, 0)
    batch = vocab.encode_batch([r.age for r in records], [r.sex for r in records],
                               [r.site for r in records])
    assert batch.age.shape == (35, 2) and batch.age[:3, 1].tolist() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------ malformed HAM10000


def _rewrite_ham(root: Path, edit) -> None:
    rows = _sample_rows(root)
    header = list(rows[0])
    header, rows = edit(header, rows)
    _write_csv(root / HAM_CSV, header, [[row.get(c, "") for c in header] for row in rows])


def _expect_error(reader, root: Path, file_name: str, row: int | None, problem: str) -> None:
    with pytest.raises(DatasetError) as info:
        reader(str(root))
    error = info.value
    assert file_name in str(error)
    assert Path(error.file).name == file_name
    assert error.row == row
    if row is not None:
        assert f"row {row}" in str(error)
    assert problem in error.problem


def test_ham10000_missing_metadata_file(sample_copy):
    (sample_copy / HAM_CSV).unlink()
    _expect_error(read_ham10000, sample_copy, HAM_CSV, None, "file not found")


def test_ham10000_missing_column(sample_copy):
    _rewrite_ham(sample_copy, lambda h, r: ([c for c in h if c != "dx"], r))
    _expect_error(read_ham10000, sample_copy, HAM_CSV, None, "missing required column 'dx'")


def test_ham10000_unknown_label(sample_copy):
    def edit(header, rows):
        rows[3]["dx"] = "xyz"
        return header, rows

    _rewrite_ham(sample_copy, edit)
    _expect_error(read_ham10000, sample_copy, HAM_CSV, 5, "unknown diagnosis label 'xyz'")


def test_ham10000_empty_label(sample_copy):
    def edit(header, rows):
        rows[0]["dx"] = ""
        return header, rows

    _rewrite_ham(sample_copy, edit)
    _expect_error(read_ham10000, sample_copy, HAM_CSV, 2, "empty 'dx'")


def test_ham10000_duplicate_image_id(sample_copy):
    def edit(header, rows):
        rows[9]["image_id"] = rows[2]["image_id"]
        return header, rows

    _rewrite_ham(sample_copy, edit)
    _expect_error(read_ham10000, sample_copy, HAM_CSV, 11, "duplicate image id")
    with pytest.raises(DatasetError, match="first in row 4"):
        read_ham10000(str(sample_copy))


@pytest.mark.parametrize("bad_id", ["../../x", "/etc/passwd", "a\\b", ".hidden"])
def test_ham10000_unsafe_image_id(sample_copy, bad_id):
    def edit(header, rows):
        rows[4]["image_id"] = bad_id
        return header, rows

    _rewrite_ham(sample_copy, edit)
    _expect_error(read_ham10000, sample_copy, HAM_CSV, 6, f"unsafe image id {bad_id!r}")


def test_ham10000_listed_image_absent(sample_copy):
    missing = _sample_rows(sample_copy)[6]["image_id"]
    (sample_copy / "images" / f"{missing}.jpg").unlink()
    _expect_error(read_ham10000, sample_copy, HAM_CSV, 8, f"image {missing!r} has no file")


def test_ham10000_unparseable_csv(sample_copy):
    with open(sample_copy / HAM_CSV, "a") as handle:
        handle.write("HAM_1,ISIC_1,mel,histo,50,male,back,EXTRA,FIELDS\n")
    _expect_error(read_ham10000, sample_copy, HAM_CSV, 37, "cannot parse CSV")


def test_ham10000_blank_lines_keep_row_numbers(sample_copy):
    text = (sample_copy / HAM_CSV).read_text().splitlines()
    text.insert(3, "")  # a blank line 4, so the old line 4 is now line 5
    text[5] = text[5].replace(",bkl,", ",xyz,")
    (sample_copy / HAM_CSV).write_text("\n".join(text) + "\n")
    _expect_error(read_ham10000, sample_copy, HAM_CSV, 6, "'xyz'")


# ------------------------------------------------------------------ ISIC 2018


ISIC2018_HEADER = ["image", *ISIC_COLUMN_NAMES["isic2018"].values()]


def _one_hot(header_codes: list[str], code: str) -> list[str]:
    return ["1.0" if name == code else "0.0" for name in header_codes]


def _isic2018_task1(root: Path, sample_dir: Path, ids: list[str], split="Training") -> None:
    for image_id in ids:
        _copy_image(sample_dir, image_id, root / f"ISIC2018_Task1-2_{split}_Input" / f"{image_id}.jpg")
        _copy_mask(sample_dir, image_id, root / f"ISIC2018_Task1_{split}_GroundTruth"
                   / f"{image_id}_segmentation.png")


def _isic2018_task3(root: Path, sample_dir: Path, rows: list[dict[str, str]],
                    split="Training") -> Path:
    columns = ISIC2018_HEADER[1:]
    for row in rows:
        _copy_image(sample_dir, row["image_id"],
                    root / f"ISIC2018_Task3_{split}_Input" / f"{row['image_id']}.jpg")
    return _write_csv(
        root / f"ISIC2018_Task3_{split}_GroundTruth" / f"ISIC2018_Task3_{split}_GroundTruth.csv",
        ISIC2018_HEADER,
        [[row["image_id"], *_one_hot(columns, ISIC_COLUMN_NAMES["isic2018"][row["dx"]])]
         for row in rows],
    )


def test_isic2018_task1_only(tmp_path, sample_dir):
    ids = [row["image_id"] for row in _sample_rows(sample_dir)[:4]]
    _isic2018_task1(tmp_path, sample_dir, ids)
    # An image without a mask is allowed; it just has no mask.
    _copy_image(sample_dir, "ISIC_0025250", tmp_path / "ISIC2018_Task1-2_Training_Input"
                / "ISIC_0025250.jpg")
    records = read_isic2018(str(tmp_path))
    assert [r.image_id for r in records] == sorted([*ids, "ISIC_0025250"])
    assert all(r.label is None for r in records)
    masks = {r.image_id: r.mask_uri for r in records}
    assert masks.pop("ISIC_0025250") is None
    assert all(uri.endswith(f"{i}_segmentation.png") for i, uri in masks.items())
    assert read_dataset(str(tmp_path), "isic2018") == records


def test_isic2018_task3_only(tmp_path, sample_dir):
    rows = _one_per_class(sample_dir)
    _isic2018_task3(tmp_path, sample_dir, rows)
    records = read_isic2018(str(tmp_path))
    assert [(r.image_id, r.label) for r in records] == [(r["image_id"], r["dx"]) for r in rows]
    assert all(r.mask_uri is None and "Task3_Training_Input" in r.image_uri for r in records)


def test_isic2018_both_tasks_join_by_image_id(tmp_path, sample_dir):
    rows = _one_per_class(sample_dir)
    _isic2018_task3(tmp_path, sample_dir, rows)
    task1_ids = [rows[0]["image_id"], rows[1]["image_id"], "ISIC_0025250"]
    _isic2018_task1(tmp_path, sample_dir, task1_ids)
    _write_csv(tmp_path / "ISIC2018_Task3_Training_LesionGroupings.csv",
               ["image", "lesion_id", "diagnosis_confirm_type"],
               [[row["image_id"], row["lesion_id"], "histopathology"] for row in rows])
    records = _by_id(read_isic2018(str(tmp_path), split="training"))
    assert len(records) == 8
    for row in rows:
        record = records[row["image_id"]]
        assert record.label == row["dx"] and record.lesion_id == row["lesion_id"]
        assert (record.mask_uri is not None) == (row["image_id"] in task1_ids)
    extra = records["ISIC_0025250"]
    assert extra.label is None and extra.mask_uri is not None


def test_isic2018_label_csv_inside_image_folder_and_other_split(tmp_path, sample_dir):
    rows = _one_per_class(sample_dir)[:3]
    csv_path = _isic2018_task3(tmp_path, sample_dir, rows, split="Validation")
    shutil.move(csv_path, tmp_path / "ISIC2018_Task3_Validation_Input" / "labels.csv")
    records = read_isic2018(str(tmp_path), "Validation")
    assert [r.label for r in records] == [row["dx"] for row in rows]
    with pytest.raises(DatasetError, match="no ISIC 2018 Training data"):
        read_isic2018(str(tmp_path))
    with pytest.raises(ValueError, match="unknown ISIC 2018 split"):
        read_isic2018(str(tmp_path), "Train")


def test_isic2018_errors(tmp_path, sample_dir):
    rows = _one_per_class(sample_dir)
    csv_path = _isic2018_task3(tmp_path, sample_dir, rows)
    name = csv_path.name
    lines = csv_path.read_text().splitlines()
    two_hot = lines[:]
    two_hot[3] = two_hot[3].replace("0.0", "1.0", 1)
    csv_path.write_text("\n".join(two_hot) + "\n")
    _expect_error(read_isic2018, tmp_path, name, 4, "expected exactly one 1")
    csv_path.write_text("\n".join([*lines, lines[2]]) + "\n")
    _expect_error(read_isic2018, tmp_path, name, 9, "duplicate image id")
    csv_path.write_text("\n".join(lines) + "\n")
    (tmp_path / "ISIC2018_Task3_Training_Input" / f"{rows[4]['image_id']}.jpg").unlink()
    _expect_error(read_isic2018, tmp_path, name, 6, "has no file")


# ------------------------------------------------------------------ ISIC 2019


ISIC2019_HEADER = ["image", *ISIC_COLUMN_NAMES["isic2019"].values(), "UNK"]
METADATA_2019_HEADER = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]


def _isic2019(root: Path, sample_dir: Path) -> list[tuple[str, str]]:
    """Seven sample images plus one relabelled as SCC; returns ``(image_id, label)`` pairs."""
    rows = _one_per_class(sample_dir)
    labelled = [(row["image_id"], row["dx"]) for row in rows]
    labelled.append(("ISIC_0025250", "scc"))
    names = ISIC2019_HEADER[1:]
    table = []
    for image_id, code in labelled:
        _copy_image(sample_dir, image_id, root / "ISIC_2019_Training_Input" / f"{image_id}.jpg")
        column = ISIC_COLUMN_NAMES["isic2019"][code]
        table.append([image_id, *_one_hot(names, column)])
    _write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ISIC2019_HEADER, table)
    _write_csv(root / "ISIC_2019_Training_Metadata.csv", METADATA_2019_HEADER, [
        [labelled[0][0], "55.0", "anterior torso", "BCN_0000001", "male"],
        [labelled[1][0], "", "", "", ""],
        [labelled[3][0], "40", "head/neck", "BCN_0000002", "female"],
        ["ISIC_9999999", "30", "palms/soles", "", "female"],  # no such image: ignored
    ])
    return labelled


def test_isic2019(tmp_path, sample_dir):
    labelled = _isic2019(tmp_path, sample_dir)
    records = read_isic2019(str(tmp_path))
    assert [(r.image_id, r.label) for r in records] == labelled
    assert class_counts(records) == {code: 1 for code in CANONICAL_CLASSES}
    akiec = _by_id(records)[labelled[3][0]]
    assert akiec.label == "akiec"  # the AK column
    assert (akiec.age, akiec.site, akiec.sex, akiec.lesion_id) == (
        40.0, "head/neck", "female", "BCN_0000002")
    first, second = records[0], records[1]
    assert (first.age, first.site, first.sex) == (55.0, "anterior torso", "male")
    assert (second.age, second.site, second.sex, second.lesion_id) == (None, None, None, None)
    assert records[-1].age is None and records[-1].mask_uri is None
    (tmp_path / "ISIC_2019_Training_Metadata.csv").unlink()  # metadata is optional
    assert [r.label for r in read_dataset(str(tmp_path), "isic2019")] == [c for _, c in labelled]


def _edit_2019(root: Path, edit) -> None:
    path = root / "ISIC_2019_Training_GroundTruth.csv"
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = edit(rows[0], rows[1:])
    _write_csv(path, header, body)


GT_2019 = "ISIC_2019_Training_GroundTruth.csv"


@pytest.mark.parametrize(
    ("edit", "row", "problem"),
    [
        (lambda h, b: ([c for c in h if c != "NV"], [r[:2] + r[3:] for r in b]), None,
         "missing required column 'NV'"),
        (lambda h, b: (h, [*b[:2], [b[2][0], *["0.0"] * 8, "1.0"], *b[3:]]), 4,
         "labelled UNK"),
        (lambda h, b: (h, [*b[:4], [b[4][0], *["0.0"] * 9], *b[5:]]), 6,
         "expected exactly one 1"),
        (lambda h, b: (h, [*b[:1], [b[1][0], "0.5", *b[1][2:]], *b[2:]]), 3,
         "column 'MEL' must be 0 or 1"),
        (lambda h, b: (h, [*b, b[5]]), 10, "duplicate image id"),
        (lambda h, b: (h, [*b, ["ISIC_0000404", "1.0", *["0.0"] * 8]]), 10, "has no file"),
    ],
    ids=["missing-column", "unk", "no-label", "bad-value", "duplicate", "absent-image"],
)
def test_isic2019_errors(tmp_path, sample_dir, edit, row, problem):
    _isic2019(tmp_path, sample_dir)
    _edit_2019(tmp_path, edit)
    _expect_error(read_isic2019, tmp_path, GT_2019, row, problem)


def test_isic2019_missing_files(tmp_path, sample_dir):
    _isic2019(tmp_path, sample_dir)
    meta = tmp_path / "ISIC_2019_Training_Metadata.csv"
    meta.write_text(meta.read_text().replace("age_approx", "age"))
    _expect_error(read_isic2019, tmp_path, meta.name, None, "'age_approx'")
    (tmp_path / GT_2019).unlink()
    _expect_error(read_isic2019, tmp_path, GT_2019, None, "file not found")


# ------------------------------------------------------------------ archives


@pytest.fixture
def archive(tmp_path, sample_dir) -> Path:
    root = tmp_path / "archive"
    ids = [row["image_id"] for row in _sample_rows(sample_dir)[:4]]
    _copy_image(sample_dir, ids[0], root / ids[0].lower().replace("isic", "scan") / "a.JPG")
    _copy_image(sample_dir, ids[1], root / "clinic" / f"{ids[1]}.jpeg")
    _copy_image(sample_dir, ids[2], root / "clinic" / "deep" / "er" / f"{ids[2]}.jpg")
    _copy_mask(sample_dir, ids[2], root / "clinic" / f"{ids[2]}_segmentation.png")  # skipped
    shutil.copyfile(sample_dir / "masks" / f"{ids[3]}_segmentation.png", root / "lesion.PNG")
    (root / "empty.jpg").write_bytes(b"")  # listed, not validated
    (root / "notes.txt").write_text("not an image")  # not an image suffix: skipped
    return root


def test_archive_without_metadata(archive, sample_dir):
    ids = [row["image_id"] for row in _sample_rows(sample_dir)[:3]]
    records = read_archive(str(archive))
    assert sorted(r.image_id for r in records) == sorted(
        ["a.JPG", f"{ids[1]}.jpeg", ids[2], "lesion.PNG", "empty"])
    for record in records:
        assert (record.label, record.age, record.sex, record.site, record.mask_uri) == (
            None, None, None, None, None)
        assert archive_image_id(Path(record.image_uri).name) == record.image_id
    assert read_dataset(str(archive), "archive") == records


def test_archive_ids_are_unique_and_stable_when_same_stem_files_arrive(tmp_path, sample_dir):
    root = tmp_path / "archive"
    _copy_image(sample_dir, "ISIC_0025250", root / "x.jpg")
    before = {r.image_id: r.image_uri for r in read_archive(str(root))}
    assert before == {"x": str(root / "x.jpg")}
    for name in ("x.png", "x.jpg.png", "x.png.jpg", "x.JPG", "x.jpeg"):
        _copy_image(sample_dir, "ISIC_0025250", root / name)
    after = {r.image_id: Path(r.image_uri).name for r in read_archive(str(root))}
    assert after == {"x": "x.jpg", "x.png": "x.png", "x.jpg.png": "x.jpg.png",
                     "x.png.jpg": "x.png.jpg", "x.JPG": "x.JPG", "x.jpeg": "x.jpeg"}
    # Hidden files (macOS's ._ copies, .cache folders) are not images to screen.
    _copy_image(sample_dir, "ISIC_0025250", root / "._x.jpg")
    _copy_image(sample_dir, "ISIC_0025250", root / ".cache" / "y.jpg")
    assert {r.image_id for r in read_archive(str(root))} == set(after)


def test_archive_gives_repeated_names_their_paths_and_refuses_unsafe_names(archive, sample_dir):
    scan = next(p for p in archive.iterdir() if p.name.startswith("scan"))
    _copy_image(sample_dir, "ISIC_0025250", archive / "other" / "a.JPG")
    ids = {Path(r.image_uri).relative_to(archive).as_posix(): r.image_id
           for r in read_archive(str(archive))}
    # The same name in two folders: both take their relative path; unique names keep theirs.
    assert ids["other/a.JPG"] == "other~a.JPG" and ids[f"{scan.name}/a.JPG"] == f"{scan.name}~a.JPG"
    assert ids["lesion.PNG"] == "lesion.PNG" and ids["empty.jpg"] == "empty"
    (archive / "other" / "a.JPG").rename(archive / "other" / "a:b.png")
    with pytest.raises(DatasetError, match=r"a:b\.png: unsafe file name .*\(':'\)"):
        read_archive(str(archive))


@pytest.mark.parametrize(
    "columns",
    [
        ("image_id", "age", "sex", "localization", "dx"),
        ("image", "age_approx", "sex", "anatom_site_general", "label"),
        ("IMAGE_ID", "Age", "Sex", "site", "diagnosis"),
    ],
)
def test_archive_metadata_column_variants(archive, tmp_path, columns):
    meta = _write_csv(tmp_path / "meta.csv", list(columns), [
        ["lesion", "42", "female", "back", "mel"],
        ["empty.jpg", "", "unknown", "", "not-a-diagnosis"],  # ids may carry the extension
        ["not-in-archive", "50", "male", "face", "nv"],
    ])
    records = _by_id(read_dataset(str(archive), "archive", metadata_uri=str(meta)))
    assert len(records) == 5
    lesion, empty = records["lesion.PNG"], records["empty"]  # "lesion" names lesion.PNG
    assert (lesion.age, lesion.sex, lesion.site) == (42.0, "female", "back")
    assert lesion.label == ("mel" if columns[-1] != "diagnosis" else None)
    assert (empty.age, empty.sex, empty.site, empty.label) == (None, "unknown", None, None)
    assert records["a.JPG"].age is None and records["a.JPG"].sex is None


def test_archive_metadata_exact_ids_win_over_stems(tmp_path, sample_dir):
    root = tmp_path / "archive"
    for name in ("x.jpg", "x.png", "y.png"):
        _copy_image(sample_dir, "ISIC_0025250", root / name)
    meta = _write_csv(tmp_path / "meta.csv", ["image_id", "age"],
                      [["x", "10"], ["x.png", "20"], ["y", "30"]])
    ages = {r.image_id: r.age for r in read_archive(str(root), str(meta))}
    assert ages == {"x": 10.0, "x.png": 20.0, "y.png": 30.0}


def test_archive_errors(archive, tmp_path):
    _expect_error(lambda root: read_archive(root, str(tmp_path / "nope.csv")), archive,
                  "nope.csv", None, "file not found")
    meta = _write_csv(tmp_path / "meta.csv", ["file", "age"], [["a", "3"]])
    _expect_error(lambda root: read_archive(root, str(meta)), archive, "meta.csv", None,
                  "'image_id' or 'image'")
    meta = _write_csv(tmp_path / "meta.csv", ["image_id", "age"], [["a", "3"], ["a", "4"]])
    _expect_error(lambda root: read_archive(root, str(meta)), archive, "meta.csv", 3,
                  "duplicate image id 'a'")
    meta = _write_csv(tmp_path / "meta.csv", ["image_id", "age"], [["a", "3"], ["../../a", "4"]])
    _expect_error(lambda root: read_archive(root, str(meta)), archive, "meta.csv", 3,
                  "unsafe image id '../../a'")
    empty_dir = tmp_path / "no-images"
    empty_dir.mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        read_archive(str(empty_dir))
    with pytest.raises(DatasetError, match="empty.jpg: not a directory"):
        read_archive(str(archive / "empty.jpg"))


# ------------------------------------------------------------------ dispatch and helpers


def test_read_dataset_rejects_unknown_format(sample_dir):
    with pytest.raises(ValueError, match="ham10000, isic2018, isic2019, archive"):
        read_dataset(str(sample_dir), "isic2020")
    with pytest.raises(ValueError, match="only to format 'archive'"):
        read_dataset(str(sample_dir), "ham10000", metadata_uri="x.csv")
    assert FORMATS == ("ham10000", "isic2018", "isic2019", "archive")


def test_records_to_frame(sample_dir):
    records = read_ham10000(str(sample_dir))
    frame = records_to_frame(records)
    assert list(frame.columns) == list(RECORD_FIELDS)
    assert len(frame) == 35 and frame["image_id"].tolist() == [r.image_id for r in records]
    assert list(records_to_frame([]).columns) == list(RECORD_FIELDS)
    assert class_counts([]) == {}
