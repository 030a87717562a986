"""The shared segment -> classify -> explain pipeline on real sample images of their own size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raysky.inference import LesionPipeline
from raysky.models import create_classifier, create_segmenter, save_checkpoint


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(create_segmenter("tiny"), str(root / "seg"), "tiny")
    save_checkpoint(create_classifier("tiny"), str(root / "cls"), "tiny")
    return LesionPipeline.from_uris(str(root / "seg"), str(root / "cls"))


def test_pipeline_returns_full_size_maps_and_valid_probabilities(pipeline, sample_dir):
    paths = sorted((sample_dir / "images").glob("*.jpg"))[:3]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    images.append(np.asarray(Image.fromarray(images[0]).resize((97, 131))))  # odd size, portrait
    results = pipeline(images, [{"age": 40, "sex": "male", "site": "back"}, {}, {"site": "??"}, {}])
    assert len(results) == 4
    for image, result in zip(images, results, strict=True):
        assert result.mask.shape == image.shape[:2] and result.mask.dtype == np.uint8
        assert set(np.unique(result.mask)) <= {0, 1}
        assert result.heatmap.shape == image.shape[:2]
        assert result.heatmap.min() >= 0.0 and result.heatmap.max() <= 1.0
        assert result.probabilities.dtype == np.float32
        assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
        assert result.predicted_class == pipeline.classes[int(result.probabilities.argmax())]
        malignant = sum(p for c, p in zip(pipeline.classes, result.probabilities, strict=True)
                        if c in ("mel", "bcc", "akiec", "scc"))
        assert result.malignant_prob == pytest.approx(malignant, abs=1e-6)
        assert result.lesion_area_frac == pytest.approx(result.mask.mean())


def test_explain_off_gives_same_prediction_without_heatmap(pipeline, sample_dir):
    image = np.asarray(Image.open(sorted((sample_dir / "images").glob("*.jpg"))[5]).convert("RGB"))
    explained = pipeline([image], explain=True)[0]
    plain = pipeline([image], explain=False)[0]
    assert plain.heatmap is None and np.isnan(plain.lesion_focus)
    np.testing.assert_allclose(plain.probabilities, explained.probabilities, atol=1e-5)


def test_swapped_checkpoints_are_refused(tmp_path):
    save_checkpoint(create_segmenter("tiny"), str(tmp_path / "seg"), "tiny")
    save_checkpoint(create_classifier("tiny"), str(tmp_path / "cls"), "tiny")
    with pytest.raises(ValueError, match="but a segmenter was expected"):
        LesionPipeline.from_uris(str(tmp_path / "cls"), str(tmp_path / "seg"))


def test_tta_answers_the_same_for_an_image_and_its_flips_and_transposes(pipeline, sample_dir):
    image = np.asarray(Image.open(sorted((sample_dir / "images").glob("*.jpg"))[7]).convert("RGB"))
    views = [(transpose, flips) for transpose in (False, True) for flips in ((), (1,), (0,), (0, 1))]
    pipeline.tta = True
    try:
        results = pipeline([np.ascontiguousarray(_dihedral(image, *view)) for view in views])
        plain_tta = results[0]
    finally:
        pipeline.tta = False
    plain = pipeline([image])[0]
    # The eight views form a group, so TTA's average is the same whichever view comes in ...
    for result, view in zip(results[1:], views[1:], strict=True):
        np.testing.assert_allclose(result.probabilities, plain_tta.probabilities, atol=1e-4)
        assert (_undo(result.mask, *view) == plain_tta.mask).mean() > 0.999
    # ... while one view alone is not invariant, so TTA changed the answer.
    assert np.abs(plain.probabilities - plain_tta.probabilities).max() > 1e-4
    assert plain_tta.heatmap is not None and plain_tta.heatmap.shape == image.shape[:2]


def _dihedral(array: np.ndarray, transpose: bool, flips: tuple[int, ...]) -> np.ndarray:
    """The view of an ``HxW[xC]`` image: transpose H and W if ``transpose``, then flip ``flips``."""
    if transpose:
        array = array.swapaxes(0, 1)
    return np.flip(array, flips) if flips else array


def _undo(array: np.ndarray, transpose: bool, flips: tuple[int, ...]) -> np.ndarray:
    """Map a view's ``HxW`` mask back onto the original image's pixels."""
    if flips:
        array = np.flip(array, flips)
    return array.swapaxes(0, 1) if transpose else array
