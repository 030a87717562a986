"""Serve's Prometheus metrics and the Open Inference Protocol routes, on a real Ray Serve over
real HTTP on 127.0.0.1. The metrics are read the way Prometheus reads them: by scraping the
local Ray node's metrics export port."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from raysky.local.net import free_port
from raysky.models import create_classifier, create_segmenter, save_checkpoint
from raysky.models.checkpoint import read_checkpoint_meta, save_calibrated

pytestmark = pytest.mark.slow

APP = "raysky-metrics"
API_KEY = "metrics-test-key-" + "7" * 24
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY_LIMIT = 256 * 1024
CALIBRATION = {"version": "cal-metrics00001", "temperature": 1.0,
               "referral": {"threshold": 0.3}, "ood": {"method": "energy", "threshold": -1.9}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Tiny checkpoints, the classifier calibrated so that refer and ood are decided."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("metrics_checkpoints")
    save_checkpoint(create_segmenter("tiny"), str(root / "segmenter"), "tiny")
    save_checkpoint(create_classifier("tiny"), str(root / "raw"), "tiny")
    save_calibrated(str(root / "raw"), str(root / "classifier"), CALIBRATION)
    return {"segmenter": str(root / "segmenter"), "classifier": str(root / "classifier")}


@pytest.fixture(scope="module")
def client(ray_local, checkpoints):
    from raysky.serve import ServeSettings, run_server, shutdown

    url = run_server(ServeSettings(**checkpoints, port=free_port(), app_name=APP,
                                   route_prefix="/", api_keys=(API_KEY,), num_cpus=1,
                                   torch_threads=1, max_body_bytes=BODY_LIMIT))
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(120.0)) as http:
            wait_ready(http)
            yield http
    finally:
        shutdown(APP)


def wait_ready(http: httpx.Client, timeout_s: float = 180.0) -> None:
    """Poll the protocol's readiness until a model replica answers: on a busy machine its
    first answer can take longer than readiness waits. Until then the answer must be the
    protocol's "false": a 4xx with an error message."""
    deadline = time.monotonic() + timeout_s
    while (answer := http.get("/v2/health/ready")).status_code != 200:
        assert answer.status_code == 400 and list(answer.json()) == ["error"], answer.text
        assert time.monotonic() < deadline, f"never ready: {answer.text}"
        time.sleep(2.0)
    assert answer.json() == {"ready": True}


def scrape() -> Counter:
    """This app's raysky samples from the node's Prometheus endpoint: (name, labels) -> value."""
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_raysky_") and sample.labels.get("application") == APP:
                labels = {k: v for k, v in sample.labels.items()
                          if k in ("predicted_class", "refer", "ood", "skin_tone", "stage",
                                   "status", "reason", "le")}
                samples[(sample.name, tuple(sorted(labels.items())))] += sample.value
    return samples


def wait_for(expected: dict, before: Counter, timeout_s: float = 90.0) -> Counter:
    """Scrape until every expected (name, labels) sample rose by its amount since ``before``
    (Ray exports every few seconds); return the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = scrape()
        missing = {k: v for k, v in expected.items() if now[k] - before[k] != v}
        if not missing:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never moved as expected: {missing}; scraped "
                                 f"{dict(now)}")
        time.sleep(2.0)


def _key(name: str, **labels: str) -> tuple:
    return (name, tuple(sorted(labels.items())))


def test_open_inference_protocol_health_and_metadata(client, checkpoints):
    before = scrape()
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2").json()["name"] == "raysky"
    assert client.get("/v2/models/raysky/ready").json() == {"name": "raysky", "ready": True}

    answer = client.get("/v2/models/raysky", headers=AUTH)
    assert answer.status_code == 200
    metadata = answer.json()
    seg = read_checkpoint_meta(checkpoints["segmenter"])
    cls = read_checkpoint_meta(checkpoints["classifier"])
    assert metadata["name"] == "raysky" and metadata["platform"] == "pytorch"
    assert metadata["versions"] == [f"{seg['version']}+{cls['version']}+cal-metrics00001"]
    assert [i["name"] for i in metadata["inputs"]][:4] == ["image", "age", "sex", "site"]
    outputs = {o["name"]: o for o in metadata["outputs"]}
    assert outputs["probabilities"] == {"name": "probabilities", "datatype": "FP32",
                                        "shape": [len(cls["classes"])]}
    assert outputs["refer"]["datatype"] == "BOOL"

    # Another model name: 404 in the protocol's error shape; metadata needs a key.
    for path in ("/v2/models/other", "/v2/models/other/ready"):
        missing = client.get(path, headers=AUTH)
        assert missing.status_code == 404, path
        assert list(missing.json()) == ["error"] and "'other'" in missing.json()["error"]
    assert client.get("/v2/models/raysky").status_code == 401
    # Counted as rejections; waiting for them also keeps them out of the next test's figures.
    wait_for({_key("ray_raysky_rejections_total", status="404", reason="model_not_found"): 2,
              _key("ray_raysky_rejections_total", status="401", reason="unauthorized"): 1},
             before)


def test_requests_move_the_right_counters(client, sample_dir: Path):
    before = scrape()
    image = sorted((sample_dir / "images").glob("*.jpg"))[0].read_bytes()
    answer = client.post("/v1/predict", headers=AUTH, files={"image": ("a.jpg", image,
                                                                       "image/jpeg")})
    assert answer.status_code == 200
    body = answer.json()
    assert body["refer"] is not None and body["ood"] is not None  # calibrated: decided
    # Three rejections: no key, not multipart, and a body over the limit.
    assert client.post("/v1/predict", files={"image": ("a.jpg", image)}).status_code == 401
    assert client.post("/v1/predict", headers={**AUTH, "Content-Type": "text/plain"},
                       content=b"x").status_code == 415
    too_big = client.post("/v1/predict", headers=AUTH,
                          files={"image": ("a.jpg", b"\0" * (BODY_LIMIT + 1))})
    assert too_big.status_code == 413

    bucket = next(b for b in (0.05 * i for i in range(1, 20)) if body["malignant_prob"] <= b)
    expected = {
        _key("ray_raysky_predictions_total", predicted_class=body["predicted_class"],
             refer=str(body["refer"]).lower(), ood=str(body["ood"]).lower()): 1,
        _key("ray_raysky_predictions_by_skin_tone_total",
             skin_tone=body["skin_tone"] or "unknown"): 1,
        _key("ray_raysky_malignant_prob_count"): 1,
        _key("ray_raysky_malignant_prob_bucket", le=f"{round(bucket, 2)}"): 1,
        **{_key("ray_raysky_stage_seconds_count", stage=s): 1
           for s in ("decode", "model", "encode")},
        _key("ray_raysky_rejections_total", status="401", reason="unauthorized"): 1,
        _key("ray_raysky_rejections_total", status="415", reason="unsupported_media_type"): 1,
        _key("ray_raysky_rejections_total", status="413", reason="body_too_large"): 1,
    }
    after = wait_for(expected, before)
    # Nothing else was predicted: one prediction in all.
    predicted = sum(v - before[k] for k, v in after.items()
                    if k[0] == "ray_raysky_predictions_total")
    assert predicted == 1
