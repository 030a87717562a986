"""ONNX export: real torch exporter, real onnxruntime, the bundled sample, tiny checkpoints.

The exports must give what PyTorch gives on the sample (probabilities within 1e-4, masks
identical at the threshold), carry what a consumer needs in their metadata, refuse damaged
checkpoints as scoring does, and fail, naming the operator, rather than change the model.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from raysky.cli.main import main
from raysky.data.images import decode_image
from raysky.inference import LesionPipeline
from raysky.models import create_classifier, create_segmenter, save_checkpoint
from raysky.models.checkpoint import save_calibrated
from raysky.models.preprocess import images_to_tensor, resize_map
from raysky.models.segmenter import MASK_THRESHOLD
from raysky.onnx.export import (
    OnnxExportError,
    export_checkpoint,
    export_module,
    read_metadata,
    session,
)
from raysky.onnx.runtime import NO_AUTOGRAD
from raysky.score.onnx_engine import onnx_pipeline

CALIBRATION = {"version": "cal-onnxtest0001", "temperature": 1.7,
               "referral": {"threshold": 0.2, "sensitivity": 0.95, "specificity": 0.5},
               "ood": {"method": "energy", "threshold": -1.9, "quantile": 0.95},
               "decision_offsets": {"mel": 0.25, "nv": -0.1, "bcc": 0.05, "akiec": 0.1, "bkl": 0.0,
                                    "df": 0.3, "vasc": 0.2}}
"""A hand-made calibration record: the export must carry it, whatever fitted it."""


@pytest.fixture(scope="module")
def sample_images(sample_dir: Path) -> tuple[list[np.ndarray], list[dict]]:
    """Every bundled image, decoded, with its metadata."""
    with open(sample_dir / "HAM10000_metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    images = [np.asarray(decode_image((sample_dir / "images" / f"{r['image_id']}.jpg").read_bytes()))
              for r in rows]
    metadata = [{"age": r["age"], "sex": r["sex"], "site": r["localization"]} for r in rows]
    return images, metadata


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, sample_images) -> dict[str, str]:
    """Tiny checkpoints; the classifier calibrated. The segmenter's 1x1 head is rescaled (no
    training) so that its masks hold lesion and background, as in the serve tests: an
    untrained segmenter's near-constant output would make every mask empty."""
    torch.manual_seed(0)
    segmenter = create_segmenter("tiny").eval()
    config = segmenter.config
    with torch.no_grad():
        logits = segmenter(images_to_tensor(sample_images[0][:8], config.input_size, config.mean,
                                            config.std))
        scale = 2.0 / max(float(logits.std()), 1e-12)
        segmenter.head.weight.mul_(scale)
        segmenter.head.bias.copy_((segmenter.head.bias - logits.median()) * scale)
    root = tmp_path_factory.mktemp("onnx_checkpoints")
    save_checkpoint(segmenter, str(root / "segmenter"), "tiny")
    save_checkpoint(create_classifier("tiny"), str(root / "raw"), "tiny")
    save_calibrated(str(root / "raw"), str(root / "classifier"), CALIBRATION)
    return {"segmenter": str(root / "segmenter"), "classifier": str(root / "classifier")}


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Both checkpoints exported through the command line."""
    root = tmp_path_factory.mktemp("onnx")
    paths = {}
    for kind, uri in checkpoints.items():
        paths[kind] = root / f"{kind}.onnx"
        assert main(["export", "onnx", "--checkpoint", uri, "--out", str(paths[kind])]) == 0
    return paths


def test_exports_carry_what_a_consumer_needs(exports, checkpoints):
    seg = read_metadata(exports["segmenter"].read_bytes())
    cls = read_metadata(exports["classifier"].read_bytes())
    seg_meta = json.loads((Path(checkpoints["segmenter"]) / "config.json").read_text())
    cls_meta = json.loads((Path(checkpoints["classifier"]) / "config.json").read_text())
    assert (seg["kind"], seg["version"], seg["input_size"]) == (
        "segmenter", seg_meta["version"], seg_meta["input_size"])
    assert seg["normalization"] == seg_meta["normalization"] and seg["mask_threshold"] == 0.5
    assert seg["weights_sha256"] == seg_meta["weights_sha256"]
    assert cls["classes"] == cls_meta["classes"] and cls["opset"] == 18
    assert cls["temperature"] == 1.7 and cls["calibration_version"] == "cal-onnxtest0001"
    assert cls["decision_offsets"] == CALIBRATION["decision_offsets"]
    assert cls["referral_threshold"] == 0.2 and cls["metadata_vocab"] == cls_meta["metadata_vocab"]
    assert cls["checkpoint"] == cls_meta
    # The graph: named inputs with a dynamic batch dimension, the opset asked for.
    model = onnx.load(str(exports["classifier"]))
    assert [i.name for i in model.graph.input] == ["image", "lesion_mask", "age", "sex", "site"]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities", "features"]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    assert {o.domain: o.version for o in model.opset_import}[""] == 18


PROBABILITY_TOLERANCE = 1e-4
"""How far ONNX Runtime's probabilities may lie from PyTorch's: the two engines sum in other
orders, so they agree to about 1e-6, not bit for bit."""


def _pixels_flipped_on_the_threshold(got: np.ndarray, want: np.ndarray,
                                     probability: np.ndarray, where: str = "") -> int:
    """How many pixels two masks disagree on, after checking that each lies within float
    rounding (1e-5) of the mask threshold: at 1e-7 apart, a pixel at 0.5000001 can fall
    either side (so can PyTorch's own on another thread count), and none elsewhere may."""
    differ = got != want
    if differ.any():
        assert np.abs(probability[differ] - MASK_THRESHOLD).max() < 1e-5, where
    return int(differ.sum())


def _lesion_probability(pipeline: LesionPipeline, images: list[np.ndarray]) -> list[np.ndarray]:
    """The PyTorch pipeline's lesion probability at each image's own size: what it thresholds
    into the mask."""
    return [resize_map(p, *image.shape[:2])
            for p, image in zip(pipeline.segment(images), images, strict=True)]


def test_onnx_runtime_matches_pytorch_on_the_sample(exports, checkpoints, sample_images):
    images, metadata = sample_images
    reference = LesionPipeline.from_uris(checkpoints["segmenter"], checkpoints["classifier"])
    ported = onnx_pipeline(exports["segmenter"].read_bytes(), exports["classifier"].read_bytes(),
                           threads=2)
    assert ported.calibration_version == "cal-onnxtest0001" and ported.temperature == 1.7
    mixed = flipped = 0
    for start in range(0, len(images), 8):  # batches of 8 and a last one of 3
        batch, batch_metadata = images[start:start + 8], metadata[start:start + 8]
        want = reference(batch, batch_metadata, explain=False)
        got = ported(batch, batch_metadata, explain=False)
        probabilities = _lesion_probability(reference, batch)
        for a, b, probability in zip(want, got, probabilities, strict=True):
            np.testing.assert_array_equal(a.mask, probability > MASK_THRESHOLD)  # as the pipeline
            np.testing.assert_allclose(b.probabilities, a.probabilities,
                                       atol=PROBABILITY_TOLERANCE, rtol=0)
            assert b.malignant_prob == pytest.approx(a.malignant_prob, abs=PROBABILITY_TOLERANCE)
            flipped += _pixels_flipped_on_the_threshold(b.mask, a.mask, probability)
            assert (b.predicted_class, b.refer, b.ood, b.skin_tone) == (
                a.predicted_class, a.refer, a.ood, a.skin_tone)
            assert b.ood_score == pytest.approx(a.ood_score, abs=1e-4)
            mixed += 0 < a.mask.mean() < 1
    assert mixed >= len(images) // 2, "the masks must hold lesion and background to prove much"
    assert flipped <= 10, f"{flipped} mask pixels differ"

    # The segmenter's own output, straight from onnxruntime: probabilities within 1e-4.
    meta = reference.segmenter_meta
    tensor = images_to_tensor(images, meta["input_size"], meta["normalization"]["mean"],
                              meta["normalization"]["std"])
    (prob,) = session(exports["segmenter"].read_bytes()).run(["lesion_prob"],
                                                              {"image": tensor.numpy()})
    with torch.no_grad():
        expected = torch.sigmoid(reference.segmenter(tensor)).numpy()
    assert np.abs(prob - expected).max() <= PROBABILITY_TOLERANCE
    flipped = _pixels_flipped_on_the_threshold(prob > MASK_THRESHOLD,
                                               expected > MASK_THRESHOLD, expected)
    assert flipped <= 10, f"{flipped} mask pixels differ"


def test_grad_cam_is_refused_not_faked(exports, sample_images):
    ported = onnx_pipeline(exports["segmenter"].read_bytes(), exports["classifier"].read_bytes())
    with pytest.raises(RuntimeError, match="cannot compute Grad-CAM"):
        ported(sample_images[0][:1], sample_images[1][:1], explain=True)
    assert "heatmaps=False" in NO_AUTOGRAD


def test_a_checkpoint_whose_weights_fail_their_sha256_is_refused(checkpoints, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoints["classifier"], damaged)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = tmp_path / "damaged.onnx"
    assert main(["export", "onnx", "--checkpoint", str(damaged), "--out", str(out)]) == 2
    assert "does not match config.json" in capsys.readouterr().err
    assert not out.exists()


class CumulativeMax(torch.nn.Module):
    """A layer whose operator (aten.cummax) ONNX has no translation for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, dim=1).values


def test_an_operator_the_opset_lacks_is_an_error_naming_it():
    with pytest.raises(OnnxExportError, match=r"toy: .*operator aten\.cummax has no ONNX"):
        export_module(CumulativeMax(), (torch.randn(2, 3),), ["x"], ["y"], what="toy")
    with pytest.raises(OnnxExportError, match="opset 13 is not supported"):
        export_module(CumulativeMax(), (torch.randn(2, 3),), ["x"], ["y"], opset=13)


def test_a_single_stream_classifier_without_metadata_takes_only_the_image(tmp_path):
    torch.manual_seed(1)
    model = create_classifier("tiny", use_metadata=False, use_lesion_stream=False)
    save_checkpoint(model, str(tmp_path / "cls"), "tiny")
    export = export_checkpoint(str(tmp_path / "cls"), str(tmp_path / "cls.onnx"), opset=20)
    assert export.inputs == ("image",) and export.opset == 20
    assert export.max_probability_diff <= 1e-4
    assert read_metadata((tmp_path / "cls.onnx").read_bytes())["temperature"] == 1.0


def test_score_with_the_onnx_engine_needs_heatmaps_off(checkpoints, sample_dir, tmp_path,
                                                        capsys):
    assert main(["score", "--input", str(sample_dir / "images"), "--output", str(tmp_path / "r"),
                 "--engine", "onnx", *_flags(checkpoints)]) == 2
    err = capsys.readouterr().err
    assert "error: --engine onnx: cannot explain" in err and "turn heatmaps off" in err
    assert not (tmp_path / "r").exists()


def _flags(checkpoints: dict[str, str]) -> list[str]:
    return ["--segmenter", checkpoints["segmenter"], "--classifier", checkpoints["classifier"]]


@pytest.mark.slow
def test_raysky_score_on_onnx_runtime_matches_the_torch_engine(ray_local, checkpoints,
                                                                sample_dir, tmp_path):
    from raysky import results
    from raysky.data.images import decode_mask

    common = ["score", "--input", str(sample_dir / "images"), "--metadata",
              str(sample_dir / "HAM10000_metadata.csv"), "--no-heatmaps", "--batch-size", "8",
              "--workers", "1", "--cpus-per-worker", "1", *_flags(checkpoints)]
    assert main([*common, "--output", str(tmp_path / "torch")]) == 0
    assert main([*common, "--output", str(tmp_path / "onnx"), "--engine", "onnx"]) == 0
    want = results.read(str(tmp_path / "torch")).set_index("image_id").sort_index()
    got = results.read(str(tmp_path / "onnx")).set_index("image_id").sort_index()
    assert len(got) == 35 and (got["status"] == "ok").all()
    assert list(got.index) == list(want.index)
    probs = [c for c in want.columns if c.startswith("prob_")] + ["malignant_prob", "ood_score"]
    np.testing.assert_allclose(got[probs].to_numpy(float), want[probs].to_numpy(float),
                               atol=1e-4, rtol=0)
    for column in ("predicted_class", "refer", "ood", "skin_tone", "classifier_version",
                   "calibration_version"):
        assert got[column].tolist() == want[column].tolist(), column
    # Masks: identical, except where a pixel's probability lies within float rounding of the
    # threshold. The two runs' actors run one thread each, the in-process test above several.
    reference = LesionPipeline.from_uris(checkpoints["segmenter"], checkpoints["classifier"])
    differing = 0
    for image_id in want.index:
        a, b = (decode_mask(frame.at[image_id, "mask_png"]) for frame in (want, got))
        if np.array_equal(a, b):
            continue
        image = np.asarray(decode_image((sample_dir / "images" / f"{image_id}.jpg").read_bytes()))
        (probability,) = _lesion_probability(reference, [image])
        differing += _pixels_flipped_on_the_threshold(b, a, probability, image_id)
    assert differing <= 10, f"{differing} mask pixels differ"
