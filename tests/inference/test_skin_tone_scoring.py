"""Skin tone at scoring time: LesionPipeline measures ITA once, and score rows and Serve answers
carry what it measured.

The tiny untrained segmenter marks every pixel as lesion, which would leave no skin to measure,
so these tests give the pipeline a stand-in segmenter that calls the dark pixels the lesion.
That keeps the test about raysky's plumbing (the predicted mask at the original size, the
result row, the answer), while the angle itself is known from the colours painted.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import color as skimage_color

from raysky import results
from raysky.data.images import decode_image, decode_mask
from raysky.data.skin_tone import ita_degrees, skin_tone_category
from raysky.inference import LesionPipeline

SKIN_L, SKIN_B = 62.0, 16.0
SKIN_ITA = math.degrees(math.atan2(SKIN_L - 50.0, SKIN_B))  # 36.9: "intermediate"


def _lab_image(lab: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = lab + rng.normal(0, 1.5, lab.shape)
    return np.rint(skimage_color.lab2rgb(noisy) * 255).astype(np.uint8)


def skin_with_lesion(shape: tuple[int, int] = (150, 200)) -> np.ndarray:
    """Skin of known L*, b* round a dark brown oval lesion, large enough (57% of the image) to
    pull even a median off the skin's angle were it not left out."""
    lab = np.empty((*shape, 3))
    lab[...] = (SKIN_L, 12.0, SKIN_B)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    oval = ((yy - shape[0] / 2) / (0.425 * shape[0])) ** 2 + \
        ((xx - shape[1] / 2) / (0.425 * shape[1])) ** 2 < 1
    lab[oval] = (30.0, 15.0, 20.0)
    return _lab_image(lab)


def plain_skin(shape: tuple[int, int]) -> np.ndarray:
    """Lesion-free skin of the known colour."""
    lab = np.empty((*shape, 3))
    lab[...] = (SKIN_L, 12.0, SKIN_B)
    return _lab_image(lab)


def dark_segmenter(images) -> torch.Tensor:
    """Stand-in for LesionPipeline.segment: lesion probability 1 on dark pixels, at 64 x 64."""
    maps = [np.asarray(Image.fromarray(image).convert("L").resize((64, 64), Image.BILINEAR)) < 90
            for image in images]
    return torch.from_numpy(np.stack(maps).astype(np.float32))


def no_lesion_segmenter(images) -> torch.Tensor:
    """Stand-in for LesionPipeline.segment that finds no lesion anywhere."""
    return torch.zeros(len(images), 64, 64)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # lossless: the colours stay known
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoints) -> LesionPipeline:
    return LesionPipeline.from_uris(tiny_checkpoints["segmenter"], tiny_checkpoints["classifier"])


def test_the_pipeline_measures_the_skin_outside_its_predicted_mask(pipeline, monkeypatch):
    monkeypatch.setattr(pipeline, "segment", dark_segmenter)
    image = skin_with_lesion()
    for explain in (True, False):
        result = pipeline([image], explain=explain)[0]
        assert 0.4 < result.lesion_area_frac < 0.7  # the oval, not everything
        # The same measurement as the audit's own on this image and this prediction's mask ...
        assert result.ita_deg == ita_degrees(image, result.mask)
        # ... which is the painted skin's angle: the lesion was left out.
        assert result.ita_deg == pytest.approx(SKIN_ITA, abs=1.0)
        assert result.skin_tone == skin_tone_category(result.ita_deg) == "intermediate"
        assert abs(ita_degrees(image, np.zeros_like(result.mask)) - SKIN_ITA) > 5  # it pulls


def test_too_dark_or_too_small_images_get_null_not_a_number(pipeline, monkeypatch):
    monkeypatch.setattr(pipeline, "segment", no_lesion_segmenter)
    black = np.full((150, 200, 3), 12, np.uint8)  # the dermatoscope's aperture, no skin
    tiny = plain_skin((20, 20))  # 400 px of good skin: too few to call a tone
    for result in pipeline([black, tiny]):
        assert result.lesion_area_frac == 0.0
        assert result.ita_deg is None and result.skin_tone is None
    # A lesion covering the whole image leaves no skin either.
    monkeypatch.setattr(pipeline, "segment", lambda images: torch.ones(len(images), 64, 64))
    covered = pipeline([skin_with_lesion()])[0]
    assert covered.ita_deg is None and covered.skin_tone is None


def test_score_rows_carry_the_skin_tone_of_their_own_mask(tiny_checkpoints, tmp_path):
    from raysky.results.columns import output_schema
    from raysky.score.stages import (
        INPUT_SCHEMA,
        ScoreModel,
        decode_batch,
        encode_batch,
    )

    images = {"lesion": skin_with_lesion(), "portrait": skin_with_lesion((180, 120)),
              "black": np.full((150, 200, 3), 12, np.uint8), "tiny": plain_skin((20, 20))}
    for name, image in images.items():
        (tmp_path / f"{name}.png").write_bytes(_png(image))
    (tmp_path / "notes.png").write_text("not an image\n")
    names = [*images, "notes"]
    inputs = pa.table({"image_id": names, "source_uri": [str(tmp_path / f"{n}.png") for n in names],
                       "age": [None] * len(names), "sex": [None] * len(names),
                       "site": [None] * len(names)}, schema=INPUT_SCHEMA)
    scorer = ScoreModel(tiny_checkpoints["segmenter"], tiny_checkpoints["classifier"],
                        heatmaps=False, threads=1)
    scorer.pipeline.segment = dark_segmenter
    schema = output_schema(scorer.classes, heatmaps=False)
    (tmp_path / "out").mkdir()
    pq.write_table(encode_batch(scorer(decode_batch(inputs)), schema),
                   tmp_path / "out" / "part-0.parquet")
    frame = results.read(str(tmp_path / "out")).set_index("image_id")
    assert str(frame["ita_deg"].dtype) == "float32"

    for name in ("lesion", "portrait"):
        row = frame.loc[name]
        decoded = np.asarray(decode_image((tmp_path / f"{name}.png").read_bytes()))
        expected = ita_degrees(decoded, decode_mask(row.mask_png))  # the stored mask
        assert row.ita_deg == pytest.approx(expected, abs=1e-3)  # float32 in the file
        assert row.ita_deg == pytest.approx(SKIN_ITA, abs=1.0)
        assert row.skin_tone == skin_tone_category(expected) == "intermediate"
    for name in ("black", "tiny", "notes"):  # not measurable, and the error row
        assert pd.isna(frame.at[name, "ita_deg"]) and pd.isna(frame.at[name, "skin_tone"]), name
    assert frame.at["notes", "status"] == "error"
    assert results.summarize(str(tmp_path / "out"))["skin_tone"] == {"intermediate": 2,
                                                                     "unknown": 2}


def test_the_serve_answer_carries_the_pipelines_skin_tone(pipeline, monkeypatch, tmp_path):
    import httpx

    from raysky.serve.api import ApiOptions, create_api
    from raysky.serve.app import LesionModel
    from raysky.serve.security import ApiKeyChecker

    # The model deployment's own batch function over this pipeline, without starting Serve.
    model = object.__new__(LesionModel.func_or_class)
    model.pipeline = pipeline
    model._stats = {"batches": 0, "requests": 0, "largest_batch": 0, "compute_s": 0.0}

    class Backend:
        async def predict(self, request):
            return model.run_batch([request])[0]

        async def info(self):
            return {}

    app = create_api(Backend(), ApiOptions(access_log=str(tmp_path / "access.log")),
                     keys=ApiKeyChecker(()))

    async def post(image: np.ndarray) -> dict:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://raysky") as client:
            reply = await client.post("/v1/predict", files={"image": ("x.png", _png(image))})
        assert reply.status_code == 200, reply.text
        return reply.json()

    monkeypatch.setattr(pipeline, "segment", dark_segmenter)
    image = skin_with_lesion()
    body = asyncio.run(post(image))
    mask = decode_mask(base64.b64decode(body["mask_png"]))
    assert body["ita_deg"] == pytest.approx(ita_degrees(image, mask), abs=1e-9)
    assert body["ita_deg"] == pytest.approx(SKIN_ITA, abs=1.0)
    assert body["skin_tone"] == "intermediate"
    monkeypatch.setattr(pipeline, "segment", no_lesion_segmenter)
    dark = asyncio.run(post(np.full((150, 200, 3), 12, np.uint8)))
    assert dark["ita_deg"] is None and dark["skin_tone"] is None
