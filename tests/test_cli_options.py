"""Every CLI flag's default is its settings dataclass's: the CLI and the Python API agree."""

from __future__ import annotations

import pytest

from raysky.audit.robustness import RobustnessSettings
from raysky.cli.main import build_parser
from raysky.cli.options import settings_defaults
from raysky.score.pipeline import ScoreSettings
from raysky.serve.config import ServeSettings
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


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_flag_defaults_are_the_settings_defaults(command):
    args = vars(build_parser().parse_args([*command.split(), *REQUIRED[command]]))
    defaults = settings_defaults(SETTINGS[command])
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
