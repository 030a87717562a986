"""The ingress's pixel budget: decoded uploads in flight stay under a bound, in arrival order."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from raysky.data.images import read_image_header
from raysky.serve.admission import BudgetTimeout, MemoryBudget
from raysky.serve.api import ApiOptions, create_api
from raysky.serve.security import ApiKeyChecker


def test_holds_within_the_budget_run_together_and_later_ones_wait_in_order():
    async def scenario():
        budget, order = MemoryBudget(100), []

        async def job(name: str, pixels: int, seconds: float):
            async with budget.hold(pixels, timeout_s=5):
                order.append((name, budget.in_use))
                await asyncio.sleep(seconds)

        first = asyncio.create_task(job("a", 60, 0.05))
        await asyncio.sleep(0)
        second = asyncio.create_task(job("b", 40, 0.05))  # fits beside a
        await asyncio.sleep(0)
        big = asyncio.create_task(job("big", 90, 0.01))  # waits for a and b
        await asyncio.sleep(0)
        small = asyncio.create_task(job("small", 5, 0.01))  # would fit, but queues behind big
        await asyncio.gather(first, second, big, small)
        return order, budget.in_use

    order, left = asyncio.run(scenario())
    # big is granted first; small fits beside it and is granted in the same release.
    assert order == [("a", 60), ("b", 100), ("big", 95), ("small", 95)]
    assert left == 0


def test_no_room_within_the_wait_raises_and_leaves_the_budget_clean():
    async def scenario():
        budget = MemoryBudget(10)
        async with budget.hold(10, timeout_s=1):
            with pytest.raises(BudgetTimeout):
                async with budget.hold(1, timeout_s=0.02):
                    pass
        async with budget.hold(10, timeout_s=0.02):  # the timed-out waiter left no trace
            pass
        return budget.in_use

    assert asyncio.run(scenario()) == 0


def test_a_cancelled_waiter_releases_its_place():
    async def scenario():
        budget = MemoryBudget(10)
        async with budget.hold(8, timeout_s=1):
            waiter = asyncio.create_task(budget.hold(8, timeout_s=5).__aenter__())
            await asyncio.sleep(0.01)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        async with budget.hold(10, timeout_s=0.05):
            return budget.in_use

    assert asyncio.run(scenario()) == 10


def test_an_image_larger_than_the_budget_runs_alone():
    async def scenario():
        budget = MemoryBudget(10)
        async with budget.hold(1_000, timeout_s=0.05):
            assert budget.in_use == 10
        return budget.in_use

    assert asyncio.run(scenario()) == 0


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        MemoryBudget(0)


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_the_header_tells_the_decode_cost_by_mode():
    rgb = read_image_header(_jpeg(200, 150))
    assert (rgb.width, rgb.height, rgb.mode, rgb.multi_frame) == (200, 150, "RGB", False)
    rgba = read_image_header(_encoded(Image.new("RGBA", (200, 150)), "PNG"))
    floats = read_image_header(_encoded(Image.new("F", (200, 150)), "TIFF"))
    # Alpha is composited at twice the cost; float data is scaled in float64.
    assert rgba.decode_bytes == 2 * rgb.decode_bytes
    assert floats.decode_bytes > 3 * rgb.decode_bytes
    frames = [Image.new("L", (20, 20), 80 * i) for i in range(3)]
    gif = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert read_image_header(gif).multi_frame


def test_the_budget_weighs_uploads_by_their_decode_cost(tmp_path: Path):
    # Room for two RGB images at once, but an RGBA upload costs as much as two of them.
    backend = RecordingBackend()
    one_image = 200 * 150
    app = create_api(backend, ApiOptions(max_inflight_pixels=2 * one_image,
                                         access_log=str(tmp_path / "access.log")),
                     keys=ApiKeyChecker(()))
    rgba = _encoded(Image.new("RGBA", (200, 150), (120, 60, 40, 128)), "PNG")
    responses = _post_all(app, [rgba] * 4)
    assert [r.status_code for r in responses] == [200] * 4
    assert backend.most_held == one_image  # one at a time


def test_the_api_refuses_to_run_without_keys_unless_told(monkeypatch):
    from raysky.serve.security import API_KEYS_ENV, API_KEYS_FILE_ENV, ApiKeyError

    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    monkeypatch.delenv(API_KEYS_FILE_ENV, raising=False)
    with pytest.raises(ApiKeyError, match="no API keys"):
        create_api(RecordingBackend())


class RecordingBackend:
    """Answers like the model deployment, slowly, and records the pixels it holds at once."""

    def __init__(self):
        self.held = 0
        self.most_held = 0

    async def predict(self, request):
        image = request["image"]
        self.held += image.shape[0] * image.shape[1]
        self.most_held = max(self.most_held, self.held)
        await asyncio.sleep(0.05)
        self.held -= image.shape[0] * image.shape[1]
        height, width = image.shape[:2]
        return {"classes": ["mel", "nv"], "probabilities": [0.25, 0.75],
                "predicted_class": "nv", "malignant_prob": 0.25, "lesion_area_frac": 0.0,
                "lesion_focus": float("nan"), "mask": np.zeros((height, width), np.uint8),
                "heatmap": None, "segmenter_version": "s", "classifier_version": "c"}

    async def info(self):
        return {}


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 60, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _post_all(app, uploads: list[bytes]) -> list[httpx.Response]:
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://raysky") as client:
            return await asyncio.gather(*(
                client.post("/v1/predict", files={"image": ("x.jpg", data)})
                for data in uploads))

    return asyncio.run(run())


def test_the_api_never_holds_more_decoded_pixels_than_its_budget(tmp_path: Path):
    backend = RecordingBackend()
    one_image = 200 * 150
    app = create_api(backend, ApiOptions(max_inflight_pixels=2 * one_image,
                                         access_log=str(tmp_path / "access.log")),
                     keys=ApiKeyChecker(()))
    responses = _post_all(app, [_jpeg(200, 150)] * 6)
    assert [r.status_code for r in responses] == [200] * 6
    assert all(r.json()["width"] == 200 and r.json()["height"] == 150 for r in responses)
    assert backend.most_held == 2 * one_image  # two at a time, never three


def test_an_upload_that_finds_no_room_in_time_gets_a_json_503(tmp_path: Path):
    backend = RecordingBackend()
    app = create_api(backend, ApiOptions(max_inflight_pixels=200 * 150, admission_timeout_s=0.01,
                                         access_log=str(tmp_path / "access.log")),
                     keys=ApiKeyChecker(()))
    responses = _post_all(app, [_jpeg(200, 150)] * 3)
    statuses = sorted(r.status_code for r in responses)
    assert statuses[0] == 200 and statuses[-1] == 503 and set(statuses) <= {200, 503}
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.json()["error"] == "unavailable" and refused.headers["retry-after"]
