"""DICOM in: files built here from the bundled sample with pydicom (JPEG baseline wrapped as
encapsulated pixel data, and uncompressed RGB and YBR), plus pydicom's own bundled test files;
decoding, header metadata, refusals that say why, and scoring end to end."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raysky import results
from raysky.data.dicom import decode_dicom, dicom_site, header_facts, is_dicom, parse_patient_age
from raysky.data.image_errors import ImageDecodeError
from raysky.data.images import decode_image, load_rgb
from raysky.data.records import LesionRecord
from raysky.score import ScoreSettings, score_archive

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import convert_color_space  # noqa: E402
from pydicom.uid import (  # noqa: E402
    DermoscopicPhotographyImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def dicom_bytes(*, jpeg: bytes | None = None, pixels: np.ndarray | None = None,
                photometric: str = "YBR_FULL_422", frames: int = 1, bits: int = 8,
                **header) -> bytes:
    """A Dermoscopic Photography object: ``jpeg`` wrapped as encapsulated JPEG baseline, or
    ``pixels`` (H x W x samples, or frames x H x W x samples) stored uncompressed."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg is not None else ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = DermoscopicPhotographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "XC"
    if jpeg is not None:
        image = Image.open(io.BytesIO(jpeg))
        ds.Rows, ds.Columns, samples = image.height, image.width, 3
        ds.PixelData = encapsulate([jpeg])
        ds["PixelData"].VR = "OB"
    else:
        shape = pixels.shape[1:] if frames > 1 else pixels.shape
        ds.Rows, ds.Columns = shape[0], shape[1]
        samples = shape[2] if len(shape) == 3 else 1
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    for keyword, value in header.items():
        if keyword == "AnatomicRegion":
            region = Dataset()
            region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = value
            ds.AnatomicRegionSequence = [region]
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def jpegs(sample_dir) -> list[bytes]:
    return [p.read_bytes() for p in sorted((sample_dir / "images").glob("*.jpg"))[:3]]


def test_jpeg_in_dicom_decodes_to_exactly_the_jpeg_files_pixels(jpegs):
    for jpeg in jpegs:
        data = dicom_bytes(jpeg=jpeg)
        assert is_dicom(data) and not is_dicom(jpeg)
        image, facts = decode_dicom(data, "x.dcm")
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), np.asarray(decode_image(jpeg)))
        assert facts.age is None and facts.manufacturer is None and facts.warning is None


def test_uncompressed_rgb_and_ybr(jpegs):
    rgb = np.asarray(decode_image(jpegs[0]))
    exact, _ = decode_dicom(dicom_bytes(pixels=rgb, photometric="RGB"))
    np.testing.assert_array_equal(np.asarray(exact), rgb)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    image, _ = decode_dicom(dicom_bytes(pixels=ybr, photometric="YBR_FULL"))
    assert np.abs(np.asarray(image).astype(int) - rgb).max() <= 3  # two rounded conversions


def test_an_rgb_jpeg_stored_without_a_colour_transform(jpegs):
    photo = decode_image(jpegs[1])
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=95, keep_rgb=True)  # Adobe marker, no transform
    image, _ = decode_dicom(dicom_bytes(jpeg=buffer.getvalue(), photometric="RGB"))
    np.testing.assert_array_equal(np.asarray(image), np.asarray(decode_image(buffer.getvalue())))
    assert np.abs(np.asarray(image).astype(int) - np.asarray(photo)).mean() < 3


SUPPORTED = ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_jpeg_no_color_transform.dcm",
             "SC_rgb_jpeg_app14_dcmd.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_rle.dcm",
             "SC_rgb_small_odd.dcm", "ExplVR_BigEnd.dcm", "examples_rgb_color.dcm"]
REFUSED = {
    "CT_small.dcm": "monochrome", "SC_rgb_rle_2frame.dcm": "2 frames",
    "examples_ybr_color.dcm": "30 frames", "SC_rgb_rle_16bit.dcm": "16-bit samples",
    "SC_rgb_gdcm_KY.dcm": "transfer syntax JPEG 2000", "examples_palette.dcm": "PALETTE COLOR",
    "image_dfl.dcm": "deflated", "rtplan.dcm": "without pixel data",
    "SC_rgb_jpeg_gdcm.dcm": "transfer syntax JPEG Lossless",
}


@pytest.mark.parametrize("name", SUPPORTED)
def test_pydicoms_colour_files_decode_as_pydicom_decodes_them(name):
    from pydicom.pixels import pixel_array

    path = TEST_FILES / name
    image, _ = decode_dicom(path.read_bytes(), name)
    expected = pixel_array(pydicom.dcmread(path), as_rgb=True)
    assert np.abs(np.asarray(image).astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_objects_are_refused_saying_why(name):
    with pytest.raises(ImageDecodeError) as error:
        decode_dicom((TEST_FILES / name).read_bytes(), name)
    assert REFUSED[name] in error.value.reason and error.value.source == name


def test_built_monochrome_multiframe_and_16_bit_objects_are_refused(jpegs):
    rgb = np.asarray(decode_image(jpegs[0]))
    cases = {
        "monochrome": dicom_bytes(pixels=rgb[..., 0].copy(), photometric="MONOCHROME2"),
        "2 frames": dicom_bytes(pixels=np.stack([rgb, rgb]), photometric="RGB", frames=2),
        "16-bit samples": dicom_bytes(pixels=rgb.astype(np.uint16) * 257, photometric="RGB",
                                      bits=16),
    }
    for reason, data in cases.items():
        with pytest.raises(ImageDecodeError, match=reason):
            decode_dicom(data, "built.dcm")
    with pytest.raises(ImageDecodeError, match="image too large"):
        decode_dicom(dicom_bytes(jpeg=jpegs[0]), "big.dcm", max_pixels=100)
    with pytest.raises(ImageDecodeError, match="corrupt DICOM|truncated|corrupt image"):
        data = dicom_bytes(jpeg=jpegs[0])
        decode_dicom(data[: len(data) // 2], "half.dcm")


@pytest.mark.parametrize("value,years,warned", [
    ("055Y", 55.0, False), ("030M", 2.5, False), ("002W", 14 / 365.25, False),
    ("010D", 10 / 365.25, False), ("", None, False), (None, None, False),
    ("55", None, True), ("Y055", None, True), ("05Y", None, True), ("999Y", None, True),
])
def test_patient_age(value, years, warned):
    age, warning = parse_patient_age(value)
    assert age == (pytest.approx(years) if years is not None else None)
    assert (warning is not None) == warned
    if warned:
        assert "malformed PatientAge" in warning and repr(value) in warning


def test_header_facts_fill_metadata_and_device_columns(jpegs):
    data = dicom_bytes(jpeg=jpegs[0], PatientAge="042Y", PatientSex="F",
                       AnatomicRegion=("181469002", "SCT", "Skin of back"), BodyPartExamined="ARM",
                       Manufacturer="Heine", ManufacturerModelName="Delta 30",
                       LightSourcePolarization="POLARIZED", ContactMethod="NON_CONTACT")
    facts = header_facts(pydicom.dcmread(io.BytesIO(data)))
    assert (facts.age, facts.sex, facts.site) == (42.0, "female", "back")  # the region wins
    assert (facts.manufacturer, facts.manufacturer_model) == ("Heine", "Delta 30")
    assert (facts.polarization, facts.contact_method) == ("POLARIZED", "NON_CONTACT")
    assert dicom_site("ARM") == "upper extremity" and dicom_site("Skin of the face") == "face"
    assert dicom_site("Structure of left thigh") == "left thigh"  # kept; folds to unknown
    assert header_facts(pydicom.dcmread(io.BytesIO(dicom_bytes(jpeg=jpegs[0], PatientSex="O")))
                        ).sex == "other"


def test_load_rgb_reads_dicom_too(jpegs, tmp_path):
    (tmp_path / "x.dcm").write_bytes(dicom_bytes(jpeg=jpegs[0]))
    np.testing.assert_array_equal(np.asarray(load_rgb(str(tmp_path / "x.dcm"))),
                                  np.asarray(decode_image(jpegs[0])))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_evaluate_audits_by_the_device_columns_and_prefers_the_datasets_metadata():
    from raysky.review.evaluate import evaluate_frame

    rng = np.random.default_rng(3)
    records, rows = [], []
    for i in range(80):
        malignant = i % 2 == 0
        p_mal = rng.uniform(0.5, 0.9) if malignant else rng.uniform(0.05, 0.5)
        image_id = f"ISIC_{i:04d}"
        records.append(LesionRecord(image_id, f"/x/{image_id}.jpg",
                                    label="mel" if malignant else "nv", age=float(20 + i % 60),
                                    sex="female", site="back", lesion_id=f"L{i}"))
        rows.append({"image_id": image_id, "status": "ok", "prob_mel": p_mal,
                     "prob_nv": 1 - p_mal, "malignant_prob": p_mal,
                     "manufacturer": "Heine" if i % 4 < 2 else "DermLite",
                     "polarization": None if i % 3 == 0 else "POLARIZED",
                     "age": None, "sex": "male" if i < 10 else None, "site": None})
    audit = evaluate_frame(pd.DataFrame(rows), records,
                           by=["manufacturer", "polarization"])["subgroups"]
    groups = {g["group"]: g["n"] for g in audit["groupings"]["manufacturer"]["groups"]}
    assert groups == {"Heine": 40, "DermLite": 40}
    assert {g["group"] for g in audit["groupings"]["polarization"]["groups"]} == {
        "POLARIZED", "unknown"}
    # Age and sex come from the dataset where it has them, not the (empty) results columns.
    assert {g["group"] for g in audit["groupings"]["sex"]["groups"]} == {"female"}
    assert "unknown" not in {g["group"] for g in audit["groupings"]["age_band"]["groups"]}


@pytest.mark.slow
def test_scoring_dicom_next_to_jpeg(ray_local, sample_dir, tiny_checkpoints, tmp_path, jpegs):
    archive, output = tmp_path / "archive", tmp_path / "results"
    archive.mkdir()
    source = sorted((sample_dir / "images").glob("*.jpg"))[0]
    shutil.copy(source, archive / "lesion.jpg")
    (archive / "lesion_plain.dcm").write_bytes(dicom_bytes(jpeg=source.read_bytes()))
    (archive / "lesion_header.dcm").write_bytes(dicom_bytes(
        jpeg=source.read_bytes(), PatientAge="067Y", PatientSex="M", BodyPartExamined="BACK",
        Manufacturer="FotoFinder", ManufacturerModelName="medicam 1000",
        LightSourcePolarization="POLARIZED", ContactMethod="CONTACT"))
    (archive / "uncompressed.DCM").write_bytes(dicom_bytes(
        pixels=np.asarray(decode_image(jpegs[1])), photometric="RGB", PatientAge="55"))
    rgb = np.asarray(decode_image(jpegs[2]))
    (archive / "mono.dcm").write_bytes(dicom_bytes(pixels=rgb[..., 0].copy(),
                                                   photometric="MONOCHROME2"))
    (archive / "cine.dcm").write_bytes(dicom_bytes(pixels=np.stack([rgb, rgb]), photometric="RGB",
                                                   frames=2))
    meta = tmp_path / "meta.csv"
    meta.write_text("image_id,age\nlesion_header.dcm,30\n")
    summary = score_archive(ScoreSettings(
        input=str(archive), output=str(output), metadata=str(meta), batch_size=3,
        rows_per_file=3, workers=1, cpus_per_worker=1, progress=False, **tiny_checkpoints))
    assert (summary.scored, summary.scored_error, summary.warnings) == (6, 2, 1)
    assert "1 inputs scored with a warning" in summary.format()
    frame = results.read(str(output)).set_index("image_id")
    probs = results.class_columns(frame)
    # The same pixels with the same (no) metadata: the same prediction, to the last bit.
    np.testing.assert_array_equal(frame.loc["lesion", probs].to_numpy(float),
                                  frame.loc["lesion_plain.dcm", probs].to_numpy(float))
    header = frame.loc["lesion_header.dcm"]
    assert (header["age"], header["age_source"]) == (30.0, "metadata")  # the CSV wins
    assert (header["sex"], header["sex_source"], header["site"], header["site_source"]) == (
        "male", "dicom", "back", "dicom")
    assert (header["manufacturer"], header["manufacturer_model"], header["polarization"],
            header["contact_method"]) == ("FotoFinder", "medicam 1000", "POLARIZED", "CONTACT")
    assert not np.array_equal(header[probs].to_numpy(float),
                              frame.loc["lesion_plain.dcm", probs].to_numpy(float))
    plain = frame.loc["lesion_plain.dcm"]
    assert pd.isna(plain["age"]) and pd.isna(plain["age_source"]) and pd.isna(plain["warning"])
    bad_age = frame.loc["uncompressed.DCM"]
    assert bad_age["status"] == "ok" and pd.isna(bad_age["age"])
    assert "malformed PatientAge '55'" in bad_age["warning"]
    assert "monochrome" in frame.loc["mono.dcm", "error"]
    assert "2 frames" in frame.loc["cine.dcm", "error"]
    assert (frame.loc[["mono.dcm", "cine.dcm"], "error_kind"] == "bad_input").all()
    assert summary.totals["warnings"] == {"malformed PatientAge '55' (expected nnnD, nnnW, "
                                          "nnnM or nnnY)": 1}
