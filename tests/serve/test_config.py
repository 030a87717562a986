"""Serve settings, API-key checks and the Serve config file, without starting Serve."""

from __future__ import annotations

import importlib
import logging
import pickle
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from raysky.serve.config import AppConfig, ServeSettings
from raysky.serve.security import (
    API_KEYS_ENV,
    API_KEYS_FILE_ENV,
    ApiKeyChecker,
    ApiKeyError,
    key_digest,
    load_api_keys,
    parse_api_keys,
    replica_checker,
)
from tests.helpers import REPO

SERVE_CONFIG = REPO / "infra" / "serve" / "raysky.yaml"


# --- API keys ------------------------------------------------------------------------------


KEY_A = "a" * 32
KEY_B = "b" * 43


def test_parse_api_keys_drops_blanks_and_comments():
    assert parse_api_keys(" a , b,,c ,") == ("a", "b", "c")
    assert parse_api_keys("# serving keys\nk1\n\n k2 ,k3\n") == ("k1", "k2", "k3")
    assert parse_api_keys("") == parse_api_keys(None) == parse_api_keys(" , ") == ()


def test_keys_come_from_a_file_the_file_variable_or_the_key_variable(tmp_path):
    secret = tmp_path / "keys"
    secret.write_text(f"# rotated 2025-01\n{KEY_A}\n{KEY_B}\n")
    other = tmp_path / "other"
    other.write_text(KEY_B)
    assert load_api_keys(str(secret), {}) == (KEY_A, KEY_B)
    # An explicit file wins over the environment; the file variable over the key variable.
    assert load_api_keys(str(secret), {API_KEYS_FILE_ENV: str(other)}) == (KEY_A, KEY_B)
    assert load_api_keys(None, {API_KEYS_FILE_ENV: str(other), API_KEYS_ENV: KEY_A}) == (KEY_B,)
    assert load_api_keys(None, {API_KEYS_ENV: f"{KEY_A},{KEY_B}"}) == (KEY_A, KEY_B)
    assert load_api_keys(None, {}) == ()
    with pytest.raises(ApiKeyError, match="cannot read the API key file"):
        load_api_keys(str(tmp_path / "missing"), {})
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(ApiKeyError, match="holds no keys"):
        load_api_keys(str(tmp_path / "empty"), {})


@pytest.mark.parametrize("where", ["env", "file"])
def test_keys_shorter_than_32_characters_are_refused_without_echoing_them(tmp_path, where):
    short = "x" * 31
    environ = {API_KEYS_ENV: f"{KEY_A},{short}"}
    if where == "file":
        (tmp_path / "keys").write_text(f"{KEY_A}\n{short}\n")
        environ = {API_KEYS_FILE_ENV: str(tmp_path / "keys")}
    with pytest.raises(ApiKeyError, match="key 2 of 2 has 31 characters; keys need at least 32") \
            as error:
        load_api_keys(None, environ)
    assert short not in str(error.value) and "token_urlsafe" in str(error.value)
    with pytest.raises(ValueError, match="at least 32"):
        from raysky.serve.app import check_api_keys

        check_api_keys(AppConfig(segmenter="s", classifier="c", api_keys=(short,)))


def test_an_endpoint_without_keys_refuses_to_start_unless_allowed(caplog):
    with pytest.raises(ApiKeyError, match="no API keys.*--allow-unauthenticated"):
        replica_checker(None, None, allow_unauthenticated=False, environ={})
    with pytest.raises(ApiKeyError, match="no API keys"):
        replica_checker((), None, allow_unauthenticated=False, environ={API_KEYS_ENV: KEY_A})
    with caplog.at_level(logging.WARNING, logger="raysky.serve.security"):
        checker = replica_checker(None, None, allow_unauthenticated=True, environ={})
    assert not checker.enabled
    assert any(r.levelno == logging.WARNING and "authentication is OFF" in r.getMessage()
               for r in caplog.records)
    from_node = replica_checker(None, None, allow_unauthenticated=False,
                                environ={API_KEYS_ENV: KEY_A})
    assert from_node.check(f"Bearer {KEY_A}") and not from_node.check(f"Bearer {KEY_B}")
    passed = replica_checker((key_digest(KEY_B),), None, allow_unauthenticated=False, environ={})
    assert passed.check(f"Bearer {KEY_B}") and not passed.check(f"Bearer {KEY_A}")


def test_checker_accepts_only_configured_bearer_keys():
    checker = ApiKeyChecker(["alpha-key", "beta-key"])
    assert checker.enabled and checker.num_keys == 2
    assert checker.check("Bearer alpha-key") and checker.check("bearer  beta-key ")
    for header in (None, "", "Bearer", "Bearer ", "Bearer alpha", "Bearer alpha-key2",
                   "Basic alpha-key", "alpha-key", "Bearer gamma-key"):
        assert not checker.check(header), header


def test_an_empty_checker_lets_everything_through():
    checker = ApiKeyChecker(())
    assert not checker.enabled
    assert checker.check(None)


# --- settings ------------------------------------------------------------------------------


def test_app_config_from_dict_names_unknown_and_missing_keys():
    with pytest.raises(ValueError, match=r"unknown raysky serve argument\(s\) \['max_batch'\]"):
        AppConfig.from_dict({"segmenter": "s", "classifier": "c", "max_batch": 4})
    with pytest.raises(ValueError, match=r"missing raysky serve argument\(s\) \['classifier'\]"):
        AppConfig.from_dict({"segmenter": "s"})
    config = AppConfig.from_dict({"segmenter": "s", "classifier": "c",
                                  "api_keys_file": "/etc/raysky/keys", "enable_docs": True})
    assert (config.api_keys_file, config.enable_docs, config.allow_unauthenticated) == (
        "/etc/raysky/keys", True, False)
    assert AppConfig.from_dict(config.to_app_args()) == config


def test_a_serve_config_cannot_carry_api_keys():
    # The dashboard shows a Serve config's application arguments in plain text.
    with pytest.raises(ValueError, match="api_keys cannot be given in a Serve config"):
        AppConfig.from_dict({"segmenter": "s", "classifier": "c", "api_keys": [KEY_A]})
    with_keys = AppConfig(segmenter="s", classifier="c", api_keys=(KEY_A,))
    assert "api_keys" not in with_keys.to_app_args()


@pytest.mark.parametrize("overrides, message", [
    ({"max_batch_size": 8, "max_ongoing_requests": 7}, "must be at least max_batch_size"),
    ({"min_replicas": 0}, "min_replicas"),
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
    ({"max_queued_requests": 0}, "max_queued_requests"),
    ({"precision": "fp16"}, "precision"),
    ({"max_body_bytes": 0}, "max_body_bytes"),
    ({"api_keys": "one-string"}, "list of keys"),
    ({"api_keys": ("k" * 32,), "api_keys_file": "/keys"}, "not both"),
    ({"model_memory_mb": 0}, "model_memory_mb"),
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
                                                                tmp_path, monkeypatch):
    from ray.serve import Application

    from raysky.serve.app import build_app

    monkeypatch.delenv(API_KEYS_FILE_ENV, raising=False)
    monkeypatch.setenv(API_KEYS_ENV, KEY_A)  # the node's keys, as the RayService sets them
    args = dict(_app(serve_config)["args"], **tiny_checkpoints)
    assert isinstance(build_app(args), Application)
    with pytest.raises(FileNotFoundError, match="not a raysky checkpoint"):
        build_app(dict(args, segmenter=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="but a segmenter was expected"):
        build_app(dict(args, segmenter=tiny_checkpoints["classifier"]))


def _deployments(app) -> dict:
    """The deployments of a built application, by name (ingress first, then what it binds)."""
    ingress = app._bound_deployment
    model = next(a for a in ingress.init_args if hasattr(a, "_bound_deployment"))
    return {d.name: d for d in (ingress, model._bound_deployment)}


def test_the_serve_config_refuses_to_build_without_keys_on_the_node(serve_config,
                                                                      tiny_checkpoints,
                                                                      monkeypatch, tmp_path):
    from raysky.serve.app import build_app

    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    monkeypatch.delenv(API_KEYS_FILE_ENV, raising=False)
    args = dict(_app(serve_config)["args"], **tiny_checkpoints)
    assert "allow_unauthenticated" not in args
    with pytest.raises(ApiKeyError, match="no API keys"):
        build_app(args)
    build_app(dict(args, allow_unauthenticated=True))
    (tmp_path / "keys").write_text(KEY_B)
    build_app(dict(args, api_keys_file=str(tmp_path / "keys")))
    monkeypatch.setenv(API_KEYS_FILE_ENV, str(tmp_path / "keys"))
    build_app(args)


def test_keys_never_travel_in_runtime_env_or_arguments(tiny_checkpoints, monkeypatch):
    from raysky.serve.app import INGRESS_DEPLOYMENT, build_application

    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    deployments = _deployments(build_application(AppConfig(**tiny_checkpoints, api_keys=(KEY_A, KEY_B))))
    for deployment in deployments.values():
        assert "runtime_env" not in (deployment.ray_actor_options or {})
        values = [a for a in deployment.init_args if not hasattr(a, "_bound_deployment")]
        shipped = pickle.dumps((values, deployment.init_kwargs, deployment.ray_actor_options))
        assert KEY_A.encode() not in shipped and KEY_B.encode() not in shipped
    # Only digests reach the ingress, and they authenticate nothing by themselves.
    assert (key_digest(KEY_A), key_digest(KEY_B)) in deployments[INGRESS_DEPLOYMENT].init_args


def test_model_replicas_reserve_memory_for_their_batch(tiny_checkpoints, monkeypatch):
    from raysky.serve.app import MODEL_DEPLOYMENT, build_application

    monkeypatch.setenv(API_KEYS_ENV, KEY_A)
    reserved = {}
    for batch in (1, 8, 16):
        config = AppConfig(**tiny_checkpoints, max_batch_size=batch,
                           max_ongoing_requests=max(16, batch))
        model = _deployments(build_application(config))[MODEL_DEPLOYMENT]
        reserved[batch] = model.ray_actor_options["memory"]
        assert reserved[batch] == config.model_memory_bytes
    assert reserved[1] < reserved[8] < reserved[16]
    assert reserved[16] - reserved[8] == 8 * (reserved[8] - reserved[1]) / 7
    pinned = AppConfig(**tiny_checkpoints, model_memory_mb=3000)
    assert _deployments(build_application(pinned))[MODEL_DEPLOYMENT].ray_actor_options["memory"] == (
        3000 * 2**20)


# --- the typed builder: what `serve run raysky.serve.app:build_app key=value ...` hands it ---


def _serve_run_builds(*arguments: str):
    """What ``serve run raysky.serve.app:build_app ARGS`` does before it starts Ray: Serve's own
    parsing of the ``key=value`` strings and its own call of the (typed) builder."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.scripts import convert_args_to_dict

    return call_user_app_builder_with_args_if_necessary(
        import_attr("raysky.serve.app:build_app"), convert_args_to_dict(arguments))


def _checkpoint_args(tiny_checkpoints) -> list[str]:
    return [f"{kind}={uri}" for kind, uri in tiny_checkpoints.items()]


def test_serve_run_strings_mean_what_they_say(tiny_checkpoints, monkeypatch):
    from raysky.serve.app import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT

    monkeypatch.setenv(API_KEYS_ENV, KEY_A)
    deployments = _deployments(_serve_run_builds(
        *_checkpoint_args(tiny_checkpoints), "max_replicas=4", "use_gpu=false",
        "enable_docs=false", "allow_unauthenticated=false", "batch_wait_timeout_s=0.01"))
    model = deployments[MODEL_DEPLOYMENT]
    assert model._deployment_config.autoscaling_config.max_replicas == 4
    assert model.ray_actor_options["num_gpus"] == 0
    assert model.init_args[2] is False  # use_gpu, as the replica's constructor receives it
    assert model._deployment_config.user_config["batch_wait_timeout_s"] == 0.01
    *_, allow_unauthenticated, enable_docs = deployments[INGRESS_DEPLOYMENT].init_args
    assert (allow_unauthenticated, enable_docs) == (False, False)
    on = _deployments(_serve_run_builds(*_checkpoint_args(tiny_checkpoints), "use_gpu=true",
                                        "enable_docs=true"))
    assert on[MODEL_DEPLOYMENT].ray_actor_options["num_gpus"] == 1
    assert on[INGRESS_DEPLOYMENT].init_args[-1] is True


def test_serve_run_without_keys_refuses_allow_unauthenticated_false(tiny_checkpoints,
                                                                     monkeypatch):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    monkeypatch.delenv(API_KEYS_FILE_ENV, raising=False)
    with pytest.raises(ApiKeyError, match="no API keys"):
        _serve_run_builds(*_checkpoint_args(tiny_checkpoints), "allow_unauthenticated=false")
    _serve_run_builds(*_checkpoint_args(tiny_checkpoints), "allow_unauthenticated=true")


@pytest.mark.parametrize("argument, names", [
    ("max_replicas=four", ("max_replicas", "valid integer")),
    ("use_gpu=maybe", ("use_gpu", "valid boolean")),
    ("num_cpus=lots", ("num_cpus", "valid number")),
    ("max_batch=4", ("unknown raysky serve argument(s) ['max_batch']", "max_batch_size")),
    ("api_keys=secret", ("api_keys cannot be given",)),
])
def test_serve_run_names_the_bad_argument_and_its_type(tiny_checkpoints, monkeypatch,
                                                       argument, names):
    monkeypatch.setenv(API_KEYS_ENV, KEY_A)
    with pytest.raises(ValueError) as refused:
        _serve_run_builds(*_checkpoint_args(tiny_checkpoints), argument)
    for name in names:
        assert name in str(refused.value)
    # The error names the argument, never its value: it could be a key.
    assert "secret" not in str(refused.value)


def test_the_serve_command_refuses_an_ill_typed_argument_before_ray_starts(tiny_checkpoints,
                                                                           tmp_path):
    """The real ``serve run`` command line, as the README shows it."""
    import os
    import subprocess
    import sys

    serve_cli = Path(sys.executable).parent / "serve"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PYTHONPATH"] = str(REPO)
    env[API_KEYS_ENV] = KEY_A
    done = subprocess.run(
        [str(serve_cli), "run", "raysky.serve.app:build_app", *_checkpoint_args(tiny_checkpoints),
         "max_replicas=four"], capture_output=True, text=True, timeout=300, env=env,
        cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "max_replicas" in output and "valid integer" in output, output
    # It failed while building the application: no Ray was started for it.
    assert "Started a local Ray instance" not in output and "Deploying" not in output, output


def test_the_yaml_config_goes_through_the_typed_builder(serve_config, tiny_checkpoints,
                                                        monkeypatch):
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from raysky.serve.app import MODEL_DEPLOYMENT

    monkeypatch.setenv(API_KEYS_ENV, KEY_A)
    app = _app(serve_config)
    args = dict(app["args"], **tiny_checkpoints)
    built = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), args)
    assert isinstance(built, Application)
    model = _deployments(built)[MODEL_DEPLOYMENT]
    assert model.ray_actor_options["num_cpus"] == args["num_cpus"]
    with pytest.raises(ValueError, match="max_batch_size"):
        call_user_app_builder_with_args_if_necessary(
            import_attr(app["import_path"]), dict(args, max_batch_size="eight"))
