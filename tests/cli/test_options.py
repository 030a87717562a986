"""Every CLI flag's default and help are its settings dataclass's: the CLI and the Python API
agree."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import MISSING, dataclass, fields, is_dataclass

import pytest

from raysky.cli.main import build_parser, flag_for, main
from raysky.cli.options import (
    SETTING_DESTS,
    add_setting,
    resolve_setting,
    settings_defaults,
    settings_from_args,
)
from raysky.score.pipeline import ScoreSettings
from raysky.score.settings import ROBUSTNESS_BATCH_SIZE, RobustnessSettings, ScoringResources
from raysky.serve.config import ServeSettings
from raysky.settings import setting, setting_help
from raysky.train.settings import TrainSettings

# CLI dest -> settings field, where the names differ.
RENAMED = {"address": "ray_address", "threads": "torch_threads", "lock_timeout": "lock_timeout_s",
           "gpu": "use_gpu"}
REQUIRED = {
    "score": ["--input", "in", "--output", "out", "--segmenter", "s", "--classifier", "c"],
    "serve": ["--segmenter", "s", "--classifier", "c"],
    "robustness": ["--segmenter", "s", "--classifier", "c", "--data", "d", "--format", "archive"],
    "train": ["segmenter", "--data", "d", "--name", "n"],
}
SETTINGS = {"score": ScoreSettings, "serve": ServeSettings, "robustness": RobustnessSettings,
            "train": TrainSettings}


def _flat_defaults(settings_class: type) -> dict:
    """``settings_defaults``, with the fields of a nested settings object under their names."""
    defaults = settings_defaults(settings_class)
    for value in list(defaults.values()):
        if is_dataclass(value):
            defaults.update({f.name: getattr(value, f.name) for f in fields(value)})
    return defaults


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_flag_defaults_are_the_settings_defaults(command):
    args = vars(build_parser().parse_args([*command.split(), *REQUIRED[command]]))
    defaults = _flat_defaults(SETTINGS[command])
    compared = 0
    for dest, value in args.items():
        field = RENAMED.get(dest, dest)
        if field in defaults and value is not None:
            expected = defaults[field]
            if command == "robustness" and field == "artefacts":
                expected = ",".join(expected)
            assert value == expected, (command, dest)
            compared += 1
    assert compared >= 5, f"only {compared} flags of {command} map to settings fields"
    if command == "serve":
        assert args["batch_wait_ms"] == defaults["batch_wait_timeout_s"] * 1000.0
        assert args["max_body_mb"] * 2**20 == defaults["max_body_bytes"]


def _commands(parser=None, prefix=()):
    """(command words, parser) of every sub-command, nested ones (train segmenter) included."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _commands(sub, (*prefix, name))


COMMANDS = {" ".join(words): sub for words, sub in _commands()}
# Commands whose flags come from a settings dataclass, with how many of them at least, so a
# command whose flags go back to hand-written defaults fails here.
SETTINGS_BACKED = {"score": 18, "pack": 3, "results": 1, "serve": 24, "robustness": 16,
                   "train segmenter": 25, "train classifier": 26, "demo": 9}


@pytest.mark.parametrize("command", sorted(SETTINGS_BACKED))
def test_every_settings_flag_reads_its_field(command):
    parser = COMMANDS[command]
    dests = parser.get_default(SETTING_DESTS)
    actions = {a.dest: a for a in parser._actions}
    assert len(dests) >= SETTINGS_BACKED[command]
    for dest, (settings_class, name, from_flag) in dests.items():
        action = actions[dest]
        owner, field_name, expected = resolve_setting(settings_class, name)
        if expected is MISSING:
            assert action.required, (command, dest)
        else:
            value = from_flag(action.default) if from_flag and action.default is not None \
                else action.default
            assert value == expected, (command, dest)
        field_help = setting_help(owner, field_name)
        assert field_help in action.help.replace("%%", "%"), (command, dest)
        if "%(default)s" in action.help:
            assert expected not in (None, MISSING) and not isinstance(expected, bool)


def test_settings_flags_are_the_settings_fields():
    """Flags read the settings object they build: a wrong or missing field name fails."""
    for command, (settings_class, required) in {
        "score": (ScoreSettings, REQUIRED["score"]),
        "serve": (ServeSettings, REQUIRED["serve"]),
        "robustness": (RobustnessSettings, REQUIRED["robustness"]),
        "train": (TrainSettings, REQUIRED["train"]),
    }.items():
        args = build_parser().parse_args([command, *required])
        built = settings_from_args(settings_class, args)
        defaults = settings_defaults(settings_class)
        for name, value in defaults.items():
            if name == "artefacts":
                continue
            assert getattr(built, name) == value, (command, name)


def test_demo_flags_build_the_settings_they_name():
    """Flag parsing only: tests/local/test_demo.py runs the real ``raysky demo`` end to end."""
    from raysky.local.demo import DemoSettings

    args = build_parser().parse_args(["demo", "--preset", "tiny", "--workers", "1", "--out", "x"])
    assert settings_from_args(DemoSettings, args) == DemoSettings(preset="tiny", workers=1, out="x")


def test_commands_without_settings_take_their_defaults_from_the_code_they_call():
    from raysky.cli.options import parameter_defaults
    from raysky.review.settings import ReportOptions
    from raysky.train.calibrate import calibrate_checkpoint

    args = build_parser().parse_args(["report", "--results", "r"])
    options = settings_from_args(ReportOptions, args, low_focus=args.low_focus)
    assert options == ReportOptions()
    calibrate = vars(build_parser().parse_args(
        ["calibrate", "--classifier", "c", "--data", "d", "--format", "archive", "--out", "o",
         "--gt-masks"]))
    expected = parameter_defaults(calibrate_checkpoint)
    assert (calibrate["referral_sensitivity"], calibrate["ood_method"]) == (
        expected["target_sensitivity"], expected["ood_method"])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: raysky {command}")


def test_top_level_help_runs_as_a_process():
    done = subprocess.run([sys.executable, "-m", "raysky.cli.main", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in ("score", "serve", "train", "robustness"))


def test_flags_in_other_units_convert_both_ways():
    args = build_parser().parse_args(["serve", *REQUIRED["serve"], "--batch-wait-ms", "5",
                                      "--max-body-mb", "1.5", "--address", "auto",
                                      "--threads", "3", "--gpu"])
    settings = settings_from_args(ServeSettings, args)
    assert settings.batch_wait_timeout_s == pytest.approx(0.005)
    assert settings.max_body_bytes == int(1.5 * 2**20)
    assert (settings.ray_address, settings.torch_threads, settings.use_gpu) == ("auto", 3, True)

    args = build_parser().parse_args(["robustness", *REQUIRED["robustness"],
                                      "--artefacts", "ink,ruler,ink"])
    assert settings_from_args(RobustnessSettings, args).artefacts == ("ink", "ruler")


def test_overrides_win_over_flags():
    args = build_parser().parse_args(["score", *REQUIRED["score"], "--top", "3"])
    assert settings_from_args(ScoreSettings, args, top=7, progress=False).top == 7


def test_one_field_serves_every_command_that_means_it():
    parser = build_parser()
    pack = vars(parser.parse_args(["pack", "--input", "i", "--output", "o"]))
    score = vars(parser.parse_args(["score", *REQUIRED["score"]]))
    assert pack["rows_per_file"] == score["rows_per_file"] == ScoreSettings.rows_per_file
    assert pack["address"] is score["address"] is None
    # robustness nests its scoring settings: the same help as score's, its own batch size.
    robustness = {a.dest: a for a in COMMANDS["robustness"]._actions}
    scoring = {a.dest: a for a in COMMANDS["score"]._actions}
    for dest in ("address", "workers", "cpus_per_worker", "gpus_per_worker", "batch_size"):
        assert robustness[dest].help == scoring[dest].help, dest
    assert robustness["batch_size"].default == ROBUSTNESS_BATCH_SIZE != ScoreSettings.batch_size
    assert issubclass(ScoreSettings, ScoringResources)  # declared once, not copied


def test_nested_settings_take_their_flags_and_keep_the_outer_defaults():
    parser = build_parser()
    args = parser.parse_args(["robustness", *REQUIRED["robustness"], "--workers", "3",
                              "--address", "auto"])
    settings = settings_from_args(RobustnessSettings, args, **{"score.progress": False})
    assert settings.score == ScoringResources(batch_size=ROBUSTNESS_BATCH_SIZE, workers=3,
                                              ray_address="auto", progress=False)
    assert settings_from_args(RobustnessSettings, parser.parse_args(
        ["robustness", *REQUIRED["robustness"]])) == RobustnessSettings(
        segmenter="s", classifier="c", data="d", format="archive")
    # Errors from the nested settings say "ray_address", the command line "--address".
    assert flag_for(parser, args, "ray_address") == "--address"
    assert flag_for(parser, args, "replicates") == "--replicates"
    with pytest.raises(KeyError, match="no settings object"):
        resolve_setting(RobustnessSettings, "seed.value")


def test_add_setting_refuses_its_own_default_and_help():
    parser = argparse.ArgumentParser()
    with pytest.raises(TypeError):
        add_setting(parser, ScoreSettings, "top", "--top", default=3)
    with pytest.raises(TypeError):
        add_setting(parser, ScoreSettings, "top", "--top", help="x")
    with pytest.raises(KeyError):
        add_setting(parser, ScoreSettings, "no_such_field", "--nope")


def test_a_field_without_help_is_an_error():
    @dataclass
    class Bare:
        plain: int = 1
        described: int = setting(2, help="100% described")

    parser = argparse.ArgumentParser()
    with pytest.raises(KeyError, match="no help"):
        add_setting(parser, Bare, "plain", "--plain")
    add_setting(parser, Bare, "described", "--described", type=int)
    assert "100% described (default: 2)" in parser.format_help()


def test_serve_builds_its_settings_from_the_flags(tmp_path, monkeypatch, capsys):
    """``raysky serve`` up to the deployment: the keys file is read once and not passed on."""
    import raysky.serve.server

    key = "k" * 40
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{key}\n")
    seen = []
    monkeypatch.setattr(raysky.serve.server, "run_server",
                        lambda settings, blocking: seen.append(settings))
    monkeypatch.chdir(tmp_path)
    assert main(["serve", *REQUIRED["serve"], "--api-keys-file", str(keys_file),
                 "--access-log", "access.jsonl", "--max-replicas", "3"]) == 0
    (settings,) = seen
    assert settings.api_keys == (key,) and settings.api_keys_file is None
    assert settings.access_log == str(tmp_path / "access.jsonl")
    assert (settings.min_replicas, settings.max_replicas) == (1, 3)
    assert "API-key auth on (1 keys)" in capsys.readouterr().out
