"""The live endpoint on a real Ray Serve, over real HTTP on 127.0.0.1, with tiny models.

Three applications share one Serve instance: the main one (API keys on, a 1 MiB body limit, a
JSON access log file, docs on), an ``/overload`` one, unauthenticated and without docs, whose
model admits one request and queues one, to provoke 503s, and a ``/batch`` one whose model
waits for four requests to fill each batch. Results are checked against the same pipeline run
in this process.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from raysky.data.images import decode_image, decode_mask
from raysky.data.taxonomy import MALIGNANT_CLASSES
from raysky.inference import LesionPipeline
from raysky.local.net import free_port
from raysky.models import create_classifier, create_segmenter, save_checkpoint
from raysky.models.checkpoint import read_checkpoint_meta

pytestmark = pytest.mark.slow

API_KEYS = ("test-key-one-" + "1" * 20, "test-key-two-" + "2" * 20)
AUTH = {"Authorization": f"Bearer {API_KEYS[1]}"}
BODY_LIMIT = 1024 * 1024
TIMEOUT = httpx.Timeout(180.0)
RESPONSE_FIELDS = {
    "image_id", "width", "height", "classes", "probabilities", "predicted_class",
    "malignant_prob", "lesion_area_frac", "lesion_focus", "mask_png", "heatmap_png",
    "segmenter_version", "classifier_version", "latency_ms", "request_id",
    "refer", "ood_score", "ood", "calibration_version", "ita_deg", "skin_tone",
}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64_image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, sample_dir: Path) -> dict[str, str]:
    """Tiny untrained checkpoints whose segmenter gives masks with lesion and background.

    An untrained segmenter's output is almost constant, so every mask would be empty and the
    mask and lesion-focus paths would go untested. Rescaling its 1x1 head (no training) spreads
    the logits around 0 over the sample images, so masks hold both classes.
    """
    torch.manual_seed(0)
    segmenter = create_segmenter("tiny").eval()
    images = [np.asarray(decode_image(p.read_bytes(), str(p)))
              for p in sorted((sample_dir / "images").glob("*.jpg"))[:8]]
    from raysky.models.preprocess import images_to_tensor

    config = segmenter.config
    with torch.no_grad():
        logits = segmenter(images_to_tensor(images, config.input_size, config.mean, config.std))
        spread = float(logits.std())
        scale = 2.0 / max(spread, 1e-12)
        segmenter.head.weight.mul_(scale)
        segmenter.head.bias.copy_((segmenter.head.bias - logits.median()) * scale)
    root = tmp_path_factory.mktemp("serve_checkpoints")
    save_checkpoint(segmenter, str(root / "segmenter"), "tiny")
    save_checkpoint(create_classifier("tiny"), str(root / "classifier"), "tiny")
    return {"segmenter": str(root / "segmenter"), "classifier": str(root / "classifier")}


@pytest.fixture(scope="module")
def pipeline(checkpoints) -> LesionPipeline:
    """The same pipeline the server runs, in this process, as the reference."""
    return LesionPipeline.from_uris(checkpoints["segmenter"], checkpoints["classifier"])


@dataclass
class Server:
    url: str
    overload_url: str
    batch_url: str
    access_log: Path


BATCH_APP = "raysky-batch"
BATCH_SIZE = 4


@pytest.fixture(scope="module")
def server(ray_local, checkpoints, tmp_path_factory):
    """Serve on a free 127.0.0.1 port with the main and the overload application."""
    from raysky.serve import ServeSettings, run_server, shutdown

    port = free_port()
    access_log = tmp_path_factory.mktemp("serve_logs") / "access.jsonl"
    url = run_server(ServeSettings(
        **checkpoints, port=port, app_name="raysky-test", api_keys=API_KEYS,
        max_body_bytes=BODY_LIMIT, access_log=str(access_log), num_cpus=1, torch_threads=2,
        enable_docs=True,
    ))
    overload_url = run_server(ServeSettings(
        **checkpoints, port=port, app_name="raysky-overload", route_prefix="/overload",
        api_keys=(), allow_unauthenticated=True, max_batch_size=1, max_ongoing_requests=1,
        max_queued_requests=1, num_cpus=0.5, torch_threads=1,
    ))
    # A batch closes only once full (the wait is far longer than any test), so requests sent
    # together are scored together.
    batch_url = run_server(ServeSettings(
        **checkpoints, port=port, app_name=BATCH_APP, route_prefix="/batch", api_keys=API_KEYS,
        max_batch_size=BATCH_SIZE, batch_wait_timeout_s=120.0, max_ongoing_requests=BATCH_SIZE,
        num_cpus=0.5, torch_threads=1,
    ))
    try:
        yield Server(url=url, overload_url=overload_url, batch_url=batch_url,
                     access_log=access_log)
    finally:
        shutdown()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        yield http


@pytest.fixture(scope="module")
def samples(sample_dir: Path) -> list[dict]:
    """One bundled image per class, with its metadata row."""
    with open(sample_dir / "HAM10000_metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    picked: dict[str, dict] = {}
    for row in rows:
        picked.setdefault(row["dx"], row)
    out = []
    for row in picked.values():
        path = sample_dir / "images" / f"{row['image_id']}.jpg"
        out.append({"image_id": row["image_id"], "bytes": path.read_bytes(),
                    "metadata": {"age": row["age"], "sex": row["sex"],
                                 "site": row["localization"]}})
    return out


@pytest.fixture(scope="module")
def openapi(client) -> dict:
    """The OpenAPI document the endpoint serves: the contract generated clients are built on."""
    return client.get("/openapi.json").json()


def assert_documented(openapi: dict, method: str, path: str, response: httpx.Response) -> None:
    """``response`` has a status the document lists for the operation, a body that validates
    against the schema listed for it, and the headers listed for it."""
    import jsonschema

    operation = openapi["paths"][path][method.lower()]
    status = str(response.status_code)
    assert status in operation["responses"], (
        f"{method} {path} answered {status}, which its OpenAPI entry does not list "
        f"({sorted(operation['responses'])})")
    documented = operation["responses"][status]
    schema = documented["content"]["application/json"]["schema"]
    # The document itself is the root the schema's $ref points into.
    jsonschema.validate(response.json(), {**schema, "components": openapi["components"]},
                        cls=jsonschema.Draft202012Validator)
    for header in documented.get("headers", {}):
        assert header.lower() in response.headers, (status, header)


def _post(client: httpx.Client, data: bytes, form: dict | None = None, params=None,
          headers=AUTH, filename="lesion.jpg") -> httpx.Response:
    return client.post("/v1/predict", files={"image": (filename, data, "image/jpeg")},
                       data=form or {}, params=params, headers=headers)


def _reference(pipeline: LesionPipeline, data: bytes, metadata: dict | None, explain=True):
    image = np.asarray(decode_image(data))
    return image, pipeline([image], [metadata or {}], explain=explain)[0]


# --- status endpoints ----------------------------------------------------------------------


def test_health_ready_model_info_and_openapi(client, checkpoints):
    seg_version = read_checkpoint_meta(checkpoints["segmenter"])["version"]
    cls_meta = read_checkpoint_meta(checkpoints["classifier"])
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/v1/model", headers=AUTH).json()
    assert (info["segmenter_version"], info["classifier_version"]) == (seg_version,
                                                                       cls_meta["version"])
    assert info["classes"] == cls_meta["classes"]
    assert info["classifier_input_size"] == cls_meta["input_size"] == 64
    assert info["max_batch_size"] == 8
    assert info["torch_threads"] == 2  # set explicitly despite Ray's OMP_NUM_THREADS=1
    assert set(info["malignant_classes"]) == set(cls_meta["classes"]) & MALIGNANT_CLASSES
    card = info["model_card"]["classifier"]
    assert card["model"]["version"] == cls_meta["version"]
    assert card["model"]["weights_sha256"] == cls_meta["weights_sha256"]
    assert card["model"]["classes"] == cls_meta["classes"] and card["intended_use"]
    assert info["model_card"]["segmenter"]["model"]["version"] == seg_version
    assert client.get("/docs").status_code == 200  # this app enables them
    predict = client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]
    form = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and set(form["properties"]) == {
        "image", "age", "sex", "site", "image_id"}
    assert {p["name"] for p in predict["parameters"]} == {"explain", "mask"}


# --- predictions ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_metadata", [True, False], ids=["metadata", "no-metadata"])
def test_predictions_match_the_in_process_pipeline(client, pipeline, samples, with_metadata):
    for sample in samples:
        form = dict(sample["metadata"], image_id=sample["image_id"]) if with_metadata else {}
        sent = time.perf_counter()
        response = _post(client, sample["bytes"], form)
        round_trip_ms = (time.perf_counter() - sent) * 1000.0
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == RESPONSE_FIELDS
        assert body["image_id"] == (sample["image_id"] if with_metadata else None)
        assert body["request_id"] == response.headers["x-request-id"]
        assert body["classes"] == list(pipeline.classes)
        assert list(body["probabilities"]) == body["classes"]
        probs = np.array([body["probabilities"][c] for c in body["classes"]])
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert body["predicted_class"] == body["classes"][int(probs.argmax())]
        malignant = [body["probabilities"][c] for c in body["classes"] if c in MALIGNANT_CLASSES]
        assert body["malignant_prob"] == pytest.approx(sum(malignant), abs=1e-6)
        assert body["segmenter_version"] == pipeline.segmenter_version
        assert body["classifier_version"] == pipeline.classifier_version
        # The server's own time lies inside the round trip this client measured.
        assert 0 < body["latency_ms"] <= round_trip_ms

        image, expected = _reference(pipeline, sample["bytes"],
                                     sample["metadata"] if with_metadata else None)
        height, width = image.shape[:2]
        assert (body["width"], body["height"]) == (width, height)
        np.testing.assert_allclose(probs, expected.probabilities, atol=1e-5)

        mask_png, heat_png = _b64_image(body["mask_png"]), _b64_image(body["heatmap_png"])
        assert mask_png.size == heat_png.size == (width, height)
        mask = decode_mask(base64.b64decode(body["mask_png"]))
        assert set(np.unique(np.asarray(mask_png))) <= {0, 255}
        assert (mask == expected.mask).mean() > 0.999
        assert body["lesion_area_frac"] == pytest.approx(mask.mean(), abs=1e-3)
        heat = np.asarray(heat_png).astype(np.float32) / 255.0
        assert heat.shape == expected.heatmap.shape
        assert np.abs(heat - expected.heatmap).max() <= 2.0 / 255.0
        if np.isnan(expected.lesion_focus):  # an all-zero heatmap has no focus
            assert body["lesion_focus"] is None
        else:
            assert body["lesion_focus"] == pytest.approx(expected.lesion_focus, abs=1e-3)


def test_masks_hold_lesion_and_background(client, samples):
    # Guards the fixture: if every mask were empty, the mask checks above would prove little.
    fractions = [_post(client, s["bytes"]).json()["lesion_area_frac"] for s in samples]
    assert any(0.0 < f < 1.0 for f in fractions), fractions


def test_metadata_reaches_the_model(client, pipeline, samples):
    sample = samples[0]
    plain = _post(client, sample["bytes"]).json()["probabilities"]
    old = {"age": "85", "sex": "female", "site": "palms/soles"}
    with_meta = _post(client, sample["bytes"], old).json()["probabilities"]
    _, expected = _reference(pipeline, sample["bytes"], old)
    np.testing.assert_allclose(list(with_meta.values()), expected.probabilities, atol=1e-5)
    assert not np.allclose(list(with_meta.values()), list(plain.values()), atol=1e-6)


def test_explain_and_mask_can_be_turned_off(client, pipeline, samples):
    sample = samples[1]
    body = _post(client, sample["bytes"], params={"explain": "false", "mask": "false"}).json()
    assert body["heatmap_png"] is None and body["mask_png"] is None
    assert body["lesion_focus"] is None
    _, expected = _reference(pipeline, sample["bytes"], None, explain=False)
    probs = [body["probabilities"][c] for c in body["classes"]]
    np.testing.assert_allclose(probs, expected.probabilities, atol=1e-5)
    assert body["lesion_area_frac"] == pytest.approx(expected.lesion_area_frac, abs=1e-3)


def _odd_images() -> dict[str, tuple[bytes, tuple[int, int]]]:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (90, 120, 4), dtype=np.uint8)
    cmyk = io.BytesIO()
    Image.new("CMYK", (80, 60), (10, 200, 30, 5)).save(cmyk, format="JPEG")
    palette = Image.fromarray(rgba[..., :3]).quantize(32)
    return {
        "rgba-png": (_png(Image.fromarray(rgba, "RGBA")), (120, 90)),
        "palette-png": (_png(palette), (120, 90)),
        "cmyk-jpeg": (cmyk.getvalue(), (80, 60)),
        "one-pixel": (_png(Image.new("RGB", (1, 1), (200, 120, 90))), (1, 1)),
        "very-wide": (_png(Image.new("L", (1500, 3), 128)), (1500, 3)),
    }


@pytest.mark.parametrize("name", list(_odd_images()))
def test_unusual_but_valid_images_are_scored_at_their_size(client, name):
    data, size = _odd_images()[name]
    response = _post(client, data, filename=f"{name}.png")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == size
    assert _b64_image(body["mask_png"]).size == _b64_image(body["heatmap_png"]).size == size


# --- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {API_KEYS[0]}"},
    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {API_KEYS[0]}x"},
], ids=["none", "wrong", "basic-scheme", "empty-token", "prefix-match"])
def test_missing_or_wrong_api_key_gets_401(client, openapi, samples, headers):
    for response in (_post(client, samples[0]["bytes"], headers=headers),
                     client.get("/v1/model", headers=headers)):
        assert response.status_code == 401
        assert response.json()["error"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert_documented(openapi, "POST", "/v1/predict", _post(client, samples[0]["bytes"],
                                                            headers=headers))
    assert_documented(openapi, "GET", "/v1/model", client.get("/v1/model", headers=headers))


def test_every_configured_key_is_accepted(client, samples):
    for key in API_KEYS:
        response = _post(client, samples[0]["bytes"], headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text


# --- bad requests --------------------------------------------------------------------------


def _multipart(fields: list[tuple[str, tuple | str]]) -> tuple[bytes, str]:
    """Hand-built multipart body, for shapes httpx will not produce."""
    boundary = "raysky-test-boundary"
    parts = []
    for name, value in fields:
        if isinstance(value, tuple):
            filename, data = value
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n")
            parts.append(f"--{boundary}\r\n{head}".encode() + data + b"\r\n")
        else:
            head = f'Content-Disposition: form-data; name="{name}"\r\n\r\n'
            parts.append(f"--{boundary}\r\n{head}{value}\r\n".encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), boundary


# The opening of a multipart body with one file part, whose content then never ends.
_FILE_PART_HEAD = _multipart([("image", ("a.jpg", b""))])[0].split(b"\r\n--")[0]


def _bomb(side: int) -> bytes:
    """A PNG of side x side 1-bit pixels: tiny on the wire, huge once decoded."""
    return _png(Image.new("1", (side, side)))


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _refused_images() -> dict[str, bytes]:
    """Valid images of kinds no dermoscope produces, which cost up to 4x more to decode."""
    rng = np.random.default_rng(1)
    frames = [Image.new("RGB", (40, 30), (60 * i, 90, 120)) for i in range(3)]
    return {
        "one-bit-png": _png(Image.new("1", (64, 48), 1)),
        "gray16-png": _png(Image.fromarray((rng.random((64, 48)) * 65535).astype(np.uint16))),
        "float32-tiff": _encoded(Image.fromarray(rng.random((64, 48)).astype(np.float32)),
                                 "TIFF"),
        "animated-gif": _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "multi-page-tiff": _encoded(frames[0], "TIFF", save_all=True,
                                    append_images=frames[1:]),
    }


@pytest.fixture(scope="module")
def jpeg(samples) -> bytes:
    return samples[0]["bytes"]


BAD_REQUESTS = {
    # name: (request builder(jpeg) -> kwargs for client.post, status, error code, field)
    "json-body": (lambda j: {"json": {"image": "x"}}, 415, "unsupported_media_type", None),
    "urlencoded-form": (lambda j: {"data": {"age": "40"}}, 415, "unsupported_media_type", None),
    "no-body": (lambda j: {}, 415, "unsupported_media_type", None),
    "missing-image": (lambda j: {"files": {"other": ("a.jpg", j)}, "data": {"age": "40"}},
                      422, "unknown_field", "other"),
    "no-image-field": (lambda j: {"data": {"age": "40"}, "files": {"image_id": ("x", b"")}},
                       422, "invalid_field", "image_id"),
    "image-as-text": (lambda j: {"content": _multipart([("image", "not a file")])[0],
                                 "headers": {"content-type": "multipart/form-data; "
                                             "boundary=raysky-test-boundary"}},
                      422, "invalid_field", "image"),
    "only-metadata": (lambda j: {"content": _multipart([("age", "40")])[0],
                                 "headers": {"content-type": "multipart/form-data; "
                                             "boundary=raysky-test-boundary"}},
                      422, "missing_field", "image"),
    "age-not-a-number": (lambda j: {"files": {"image": ("a.jpg", j)}, "data": {"age": "abc"}},
                         422, "invalid_metadata", "age"),
    "age-negative": (lambda j: {"files": {"image": ("a.jpg", j)}, "data": {"age": "-3"}},
                     422, "invalid_metadata", "age"),
    "age-implausible": (lambda j: {"files": {"image": ("a.jpg", j)}, "data": {"age": "250"}},
                        422, "invalid_metadata", "age"),
    "age-nan": (lambda j: {"files": {"image": ("a.jpg", j)}, "data": {"age": "nan"}},
                422, "invalid_metadata", "age"),
    "sex-unknown-value": (lambda j: {"files": {"image": ("a.jpg", j)}, "data": {"sex": "x"}},
                          422, "invalid_metadata", "sex"),
    "site-unknown-value": (lambda j: {"files": {"image": ("a.jpg", j)}, "data": {"site": "moon"}},
                           422, "invalid_metadata", "site"),
    "typo-field": (lambda j: {"files": {"image": ("a.jpg", j)}, "data": {"gender": "male"}},
                   422, "unknown_field", "gender"),
    "bad-image-id": (lambda j: {"files": {"image": ("a.jpg", j)},
                                "data": {"image_id": "a b; rm -rf"}},
                     422, "invalid_field", "image_id"),
    "bad-explain-flag": (lambda j: {"files": {"image": ("a.jpg", j)},
                                    "params": {"explain": "maybe"}},
                         422, "invalid_request", "explain"),
    "garbage-bytes": (lambda j: {"files": {"image": ("a.jpg", os.urandom(2048))}},
                      415, "unsupported_image", "image"),
    "text-file": (lambda j: {"files": {"image": ("notes.txt", b"age 47, male, back")}},
                  415, "unsupported_image", "image"),
    "pdf-file": (lambda j: {"files": {"image": ("scan.pdf", b"%PDF-1.4\n%\xe2\xe3\n1 0 obj\n")}},
                 415, "unsupported_image", "image"),
    "empty-file": (lambda j: {"files": {"image": ("a.jpg", b"")}}, 400, "invalid_image", "image"),
    **{name: (lambda j, name=name, data=data: {"files": {"image": (f"{name}.img", data)}},
              415, "unsupported_image", "image")
       for name, data in _refused_images().items()},
    "truncated-jpeg": (lambda j: {"files": {"image": ("a.jpg", j[: len(j) // 2])}},
                       400, "invalid_image", "image"),
    "decompression-bomb": (lambda j: {"files": {"image": ("bomb.png", _bomb(12_000))}},
                           413, "image_too_large", "image"),
    "decompression-bomb-past-pillow-limit": (
        lambda j: {"files": {"image": ("bomb.png", _bomb(20_000))}},
        413, "image_too_large", "image"),
    "body-over-limit": (lambda j: {"files": {"image": ("big.jpg", os.urandom(BODY_LIMIT + 1))}},
                        413, "body_too_large", None),
    "chunked-body-over-limit": (
        # No Content-Length: the limit must hold while the stream is read.
        lambda j: {"content": iter([_FILE_PART_HEAD] + [b"x" * 65536] * (BODY_LIMIT // 65536 + 2)),
                   "headers": {"content-type": "multipart/form-data; "
                               "boundary=raysky-test-boundary"}},
        413, "body_too_large", None),
    "two-images": (lambda j: {"content": _multipart([("image", ("a.jpg", j)),
                                                     ("image", ("b.jpg", j))])[0],
                              "headers": {"content-type": "multipart/form-data; "
                                          "boundary=raysky-test-boundary"}},
                   400, "bad_request", None),
    "malformed-multipart": (lambda j: {"content": b"--nope\r\nthis is not multipart",
                                       "headers": {"content-type": "multipart/form-data"}},
                            400, "bad_request", None),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_a_json_4xx(client, openapi, jpeg, name):
    build, status, code, field = BAD_REQUESTS[name]
    kwargs = build(jpeg)
    kwargs["headers"] = {**AUTH, **kwargs.get("headers", {})}
    response = client.post("/v1/predict", **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    assert body["detail"]
    assert body.get("field") == field
    assert body["request_id"] == response.headers["x-request-id"]
    assert_documented(openapi, "POST", "/v1/predict", response)


def test_every_error_the_document_lists_has_the_one_error_schema(openapi):
    """One schema for all errors, FastAPI's HTTPValidationError (not what raysky sends) nowhere,
    and the statuses each route answers listed, as generated clients need."""
    assert "HTTPValidationError" not in json.dumps(openapi)
    listed = {}
    for path, methods in openapi["paths"].items():
        for method, operation in methods.items():
            errors = {s: r for s, r in operation["responses"].items() if s[0] in "45"}
            listed[f"{method.upper()} {path}"] = set(errors)
            for status, response in errors.items():
                schema = response["content"]["application/json"]["schema"]
                # The Open Inference Protocol's routes answer its own {"error": ...} object.
                allowed = ({"$ref": "#/components/schemas/Error"},
                           {"$ref": "#/components/schemas/ProtocolError"})
                assert schema in (allowed if path.startswith("/v2") else allowed[:1]), (path, status)
    assert listed["POST /v1/predict"] >= {"400", "401", "413", "415", "422", "500", "503"}
    assert listed["GET /v1/model"] >= {"400", "401", "413", "500", "503"}
    assert listed["GET /readyz"] >= {"400", "413", "500", "503"}
    assert listed["GET /healthz"] >= {"400", "413", "500"}
    metadata = openapi["paths"]["/v2/models/{name}"]["get"]
    assert metadata["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ProtocolError"}
    assert [p["name"] for p in metadata["parameters"]] == ["name"]
    error = openapi["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"error", "detail", "request_id"}
    assert error["additionalProperties"] is False


def test_limits_checked_before_routing_answer_as_documented(server, client, openapi):
    import http.client
    from urllib.parse import urlparse

    # The body-limit middleware answers any route from the declared length alone, before a
    # byte of the body is sent (httpx will not send a length it does not then send).
    where = urlparse(server.url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    connection.putrequest("GET", "/healthz")
    connection.putheader("Content-Length", str(BODY_LIMIT + 1))
    connection.endheaders()
    answer = connection.getresponse()
    too_long = httpx.Response(answer.status, headers=answer.getheaders(), content=answer.read())
    connection.close()
    assert too_long.status_code == 413 and too_long.json()["error"] == "body_too_large"
    assert_documented(openapi, "GET", "/healthz", too_long)
    no_type = client.post("/v1/predict", content=b"raw bytes", headers=AUTH)
    assert no_type.status_code == 415
    assert_documented(openapi, "POST", "/v1/predict", no_type)


def test_wrong_method_and_unknown_path_get_json_errors(client):
    assert client.get("/v1/predict", headers=AUTH).json()["error"] == "method_not_allowed"
    assert client.get("/v2/whatever").json()["error"] == "not_found"


def test_server_still_serves_after_bad_requests(client, jpeg):
    # A bad request must not break the replica for the next client.
    assert _post(client, jpeg[:600]).status_code == 400
    assert _post(client, jpeg).status_code == 200


# --- concurrency, batching, overload ------------------------------------------------------


async def _post_many(url: str, payloads: list[tuple[bytes, dict, dict]], headers=AUTH):
    limits = httpx.Limits(max_connections=len(payloads))
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as http:
        return await asyncio.gather(*(
            http.post("/v1/predict", files={"image": ("x.jpg", data, "image/jpeg")}, data=form,
                      params=params, headers=headers)
            for data, form, params in payloads))


def test_32_concurrent_requests_match_sequential_results(server, client, samples):
    # Mixed metadata and explain flags, so batches hold requests of every kind at once.
    # Eight kinds of request, each sent four times: (sample, with metadata, explain).
    keys = [(i % 4, i % 8 >= 4, i % 8 not in (3, 6)) for i in range(32)]

    def payload(key):
        sample, with_meta, explain = key
        return (samples[sample]["bytes"], samples[sample]["metadata"] if with_meta else {},
                {"explain": str(explain).lower()})

    sequential = {}
    for key in keys:
        if key not in sequential:
            sequential[key] = _post(client, *payload(key)[:2], params=payload(key)[2]).json()
    responses = asyncio.run(_post_many(server.url, [payload(k) for k in keys]))
    assert [r.status_code for r in responses] == [200] * 32
    for key, response in zip(keys, responses, strict=True):
        body, reference = response.json(), sequential[key]
        probs = [body["probabilities"][c] for c in body["classes"]]
        ref = [reference["probabilities"][c] for c in reference["classes"]]
        np.testing.assert_allclose(probs, ref, atol=1e-5)
        assert body["predicted_class"] == reference["predicted_class"]
        assert body["lesion_area_frac"] == pytest.approx(reference["lesion_area_frac"], abs=1e-3)
        if not key[2]:
            assert body["heatmap_png"] is None
            continue
        heat = np.asarray(_b64_image(body["heatmap_png"]), dtype=np.int16)
        ref_heat = np.asarray(_b64_image(reference["heatmap_png"]), dtype=np.int16)
        assert np.abs(heat - ref_heat).max() <= 2
    stats = client.get("/v1/model", headers=AUTH).json()["replica_stats"]
    assert stats["largest_batch"] > 1, stats  # concurrent requests were actually batched


def test_overload_gets_503_not_500(server, openapi, samples):
    payloads = [(samples[i % len(samples)]["bytes"], {}, {}) for i in range(48)]
    responses = asyncio.run(_post_many(server.overload_url, payloads, headers={}))
    statuses = sorted({r.status_code for r in responses})
    assert set(statuses) <= {200, 503}, [r.text for r in responses if r.status_code not in
                                         (200, 503)]
    assert 200 in statuses and 503 in statuses, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.json()["error"] == "unavailable"
    assert int(rejected.headers["retry-after"]) >= 1
    assert_documented(openapi, "POST", "/v1/predict", rejected)


# --- access log ----------------------------------------------------------------------------


def test_access_log_is_json_without_patient_metadata(server, client, jpeg):
    secrets = {"age": "93", "sex": "female", "site": "palms/soles",
               "image_id": "PATIENT-Jane-Doe-1931"}
    ok = _post(client, jpeg, secrets)
    bad = _post(client, jpeg, dict(secrets, age="ninety-three"))
    assert (ok.status_code, bad.status_code) == (200, 422)
    wanted = {ok.headers["x-request-id"]: ok, bad.headers["x-request-id"]: bad}
    deadline = time.monotonic() + 30
    entries: dict[str, dict] = {}
    while time.monotonic() < deadline and set(entries) != set(wanted):
        text = server.access_log.read_text() if server.access_log.exists() else ""
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        entries = {e["request_id"]: e for e in lines if e["request_id"] in wanted}
        time.sleep(0.2)
    assert set(entries) == set(wanted)
    for request_id, entry in entries.items():
        assert entry["method"] == "POST" and entry["path"].endswith("/v1/predict")
        assert entry["status"] == wanted[request_id].status_code
        # The access log times the whole request, the model's share of it included.
        assert entry["latency_ms"] >= entry.get("model_ms", 0.0) >= 0.0
        if wanted[request_id].status_code == 200:
            assert entry["latency_ms"] >= wanted[request_id].json()["latency_ms"]
    accepted = entries[ok.headers["x-request-id"]]
    assert (accepted["image_bytes"], accepted["image_width"], accepted["image_height"]) == (
        len(jpeg), 200, 150)
    assert entries[bad.headers["x-request-id"]]["error"] == "invalid_metadata"
    log_text = server.access_log.read_text()
    for value in (secrets["image_id"], "Jane", "female", "palms", "ninety-three"):
        assert value not in log_text
    for key in ("age", "sex", "site", "image_id"):
        assert f'"{key}"' not in log_text


# --- hardening: docs off by default, cached readiness, one bad request per batch ----------


def test_docs_and_schema_are_off_unless_enabled(server):
    with httpx.Client(base_url=server.overload_url, timeout=TIMEOUT) as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            response = http.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"] == "not_found"
        assert http.get("/healthz").status_code == 200


def test_readiness_probes_cannot_fill_the_model_queue(server):
    # The overload app's model admits one request and queues one: uncached, a burst of
    # probes would get 503s from its queue.
    async def probe(count: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(base_url=server.overload_url, timeout=TIMEOUT,
                                     limits=limits) as http:
            return await asyncio.gather(*(http.get("/readyz") for _ in range(count)))

    responses = asyncio.run(probe(40))
    assert [r.status_code for r in responses] == [200] * 40, {r.text for r in responses}


def test_one_bad_request_fails_alone_not_its_whole_batch(server, samples):
    """Three good uploads and one request that breaks the pipeline fill one batch together."""
    from ray import serve

    from raysky.serve.app import MODEL_DEPLOYMENT

    model = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=BATCH_APP)
    # Past the HTTP checks no upload can break the pipeline, so the broken one goes to the
    # model directly: a flat array, which the pipeline cannot resize.
    broken = {"image": np.zeros(7, np.uint8), "metadata": {}, "explain": True, "mask": True}

    async def together():
        failing = asyncio.ensure_future(model.predict.remote(broken))
        good = asyncio.ensure_future(_post_many(
            server.batch_url, [(s["bytes"], {}, {}) for s in samples[:BATCH_SIZE - 1]]))
        return await asyncio.gather(failing, good, return_exceptions=True)

    failed, responses = asyncio.run(together())
    assert isinstance(failed, Exception), failed
    assert [r.status_code for r in responses] == [200] * (BATCH_SIZE - 1), [
        r.text for r in responses]
    assert all(r.json()["predicted_class"] in r.json()["classes"] for r in responses)
    with httpx.Client(base_url=server.batch_url, timeout=TIMEOUT) as http:
        stats = http.get("/v1/model", headers=AUTH).json()["replica_stats"]
    # Each request was scored on its own after the shared batch failed.
    assert stats["largest_batch"] == 1 and stats["requests"] == BATCH_SIZE - 1, stats
