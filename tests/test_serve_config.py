"""Serve settings, API-key checks and the Serve config file, without starting Serve."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from raysky.serve.config import AppConfig, ServeSettings
from raysky.serve.security import API_KEYS_ENV, ApiKeyChecker, parse_api_keys

SERVE_CONFIG = Path(__file__).resolve().parents[1] / "infra" / "serve" / "raysky.yaml"


# --- API keys ------------------------------------------------------------------------------


def test_parse_api_keys_drops_blanks():
    assert parse_api_keys(" a , b,,c ,") == ("a", "b", "c")
    assert parse_api_keys("") == parse_api_keys(None) == parse_api_keys(" , ") == ()


def test_checker_accepts_only_configured_bearer_keys():
    checker = ApiKeyChecker(["alpha-key", "beta-key"])
    assert checker.enabled and checker.num_keys == 2
    assert checker.check("Bearer alpha-key") and checker.check("bearer  beta-key ")
    for header in (None, "", "Bearer", "Bearer ", "Bearer alpha", "Bearer alpha-key2",
                   "Basic alpha-key", "alpha-key", "Bearer gamma-key"):
        assert not checker.check(header), header


def test_checker_without_keys_lets_everything_through():
    checker = ApiKeyChecker.from_env({API_KEYS_ENV: " , "})
    assert not checker.enabled
    assert checker.check(None)
    assert ApiKeyChecker.from_env({API_KEYS_ENV: "k1,k2"}).check("Bearer k2")
    assert not ApiKeyChecker.from_env({}).enabled


# --- settings ------------------------------------------------------------------------------


def test_app_config_from_dict_names_unknown_and_missing_keys():
    with pytest.raises(ValueError, match=r"unknown raysky serve argument\(s\) \['max_batch'\]"):
        AppConfig.from_dict({"segmenter": "s", "classifier": "c", "max_batch": 4})
    with pytest.raises(ValueError, match=r"missing raysky serve argument\(s\) \['classifier'\]"):
        AppConfig.from_dict({"segmenter": "s"})
    config = AppConfig.from_dict({"segmenter": "s", "classifier": "c", "api_keys": ["k"]})
    assert config.api_keys == ("k",)
    assert AppConfig.from_dict(config.to_app_args()) == config


@pytest.mark.parametrize("overrides, message", [
    ({"max_batch_size": 8, "max_ongoing_requests": 7}, "must be at least max_batch_size"),
    ({"min_replicas": 0}, "min_replicas"),
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
    ({"max_queued_requests": 0}, "max_queued_requests"),
    ({"precision": "fp16"}, "precision"),
    ({"max_body_bytes": 0}, "max_body_bytes"),
    ({"api_keys": "one-string"}, "list of keys"),
    ({"segmenter": ""}, "segmenter and a classifier"),
])
def test_inconsistent_settings_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        AppConfig(**{"segmenter": "s", "classifier": "c", **overrides})


def test_defaults_follow_the_issue():
    settings = ServeSettings(segmenter="s", classifier="c")
    assert settings.max_batch_size >= 8
    assert settings.max_ongoing_requests >= settings.max_batch_size
    assert settings.max_body_bytes == 20 * 1024 * 1024
    assert settings.threads == 1 and settings.target_ongoing == settings.max_batch_size
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    with pytest.raises(ValueError, match="route_prefix"):
        ServeSettings(segmenter="s", classifier="c", route_prefix="v1")


# --- the Serve config file -----------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def _app(serve_config: dict) -> dict:
    (app,) = serve_config["applications"]
    return app


def test_serve_config_validates_against_serves_schema(serve_config):
    schema = ServeDeploySchema.model_validate(serve_config)
    assert [a.name for a in schema.applications] == ["raysky"]


def test_serve_config_builder_and_args_are_valid(serve_config):
    app = _app(serve_config)
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    from raysky.serve.app import build_app

    assert builder is build_app
    config = AppConfig.from_dict(app["args"])
    assert config.segmenter.startswith("s3://") and config.classifier.startswith("s3://")
    assert config.max_batch_size >= 8 and config.threads == config.num_cpus


def test_serve_config_autoscales_and_bounds_queues(serve_config):
    app = _app(serve_config)
    deployments = {d["name"]: d for d in app["deployments"]}
    from raysky.serve.app import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT

    assert set(deployments) == {MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT}
    model = deployments[MODEL_DEPLOYMENT]
    scaling = model["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
    assert scaling["target_ongoing_requests"] > 0
    assert model["max_ongoing_requests"] >= app["args"]["max_batch_size"]
    assert model["max_queued_requests"] > 0  # beyond it: 503, not an unbounded queue


def test_serve_config_holds_no_api_keys(serve_config):
    text = SERVE_CONFIG.read_text()
    assert "api_keys" not in _app(serve_config)["args"]
    assert f"{API_KEYS_ENV}:" not in text and "env_vars" not in text


def test_builder_accepts_the_config_args_with_real_checkpoints(serve_config, tiny_checkpoints,
                                                                tmp_path):
    from ray.serve import Application

    from raysky.serve.app import build_app

    args = dict(_app(serve_config)["args"], **tiny_checkpoints)
    assert isinstance(build_app(args), Application)
    with pytest.raises(FileNotFoundError, match="not a raysky checkpoint"):
        build_app(dict(args, segmenter=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="but a segmenter was expected"):
        build_app(dict(args, segmenter=tiny_checkpoints["classifier"]))
