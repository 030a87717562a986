"""The command line as a scheduler sees it, through the real entry points: ``python -m raysky``
and the exit codes docs/cli/index.md lists (0 done, 1 failure, 2 usage or bad input, 75 try again
later). No Ray: every case here stops before it would start one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysky.cli.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_TEMPFAIL, EXIT_USAGE
from tests.helpers import REPO


def _raysky(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m raysky ARGS`` with this checkout's code, as a separate process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "raysky", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_the_codes_are_the_documented_ones():
    assert (EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_TEMPFAIL) == (0, 1, 2, 75)
    page = (REPO / "docs" / "cli" / "index.md").read_text()
    for code, meaning in ((0, "done"), (1, "failure"), (2, "usage"), (75, "EX_TEMPFAIL")):
        assert f"| {code} |" in page and meaning in page, code


def test_python_m_raysky_is_the_raysky_command(tmp_path):
    version = _raysky("--version", cwd=tmp_path)
    assert version.returncode == EXIT_OK and version.stdout.startswith("raysky ")
    assert _raysky(cwd=tmp_path).returncode == EXIT_USAGE  # no command: help, usage error
    incomplete = _raysky("score", "--input", "x", cwd=tmp_path)
    assert incomplete.returncode == EXIT_USAGE and "required" in incomplete.stderr


def test_bad_input_exits_2_with_one_line_naming_it(tmp_path):
    done = _raysky("results", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert done.returncode == EXIT_USAGE
    assert done.stderr.strip() == (f"raysky results: error: {tmp_path / 'nowhere'}: no result "
                                   "files (part-*.parquet)")


def test_a_failure_that_is_not_the_input_exits_1(tmp_path):
    """An S3 endpoint that refuses connections: the command is right, the run failed."""
    env_keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
    saved = {k: os.environ.get(k) for k in env_keys}
    os.environ.update(AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="x",
                      AWS_SECRET_ACCESS_KEY="y", AWS_REGION="us-east-1")
    try:
        done = _raysky("results", "s3://raysky-nowhere/results", cwd=tmp_path)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert done.returncode == EXIT_FAILURE, done.stderr
    assert "Could not connect" in done.stderr  # the traceback a bug report needs
    assert done.stderr.strip().endswith("raysky results: failed (exit 1)")


def _score_args(archive: Path, output: Path, checkpoints: dict, *extra: str) -> list[str]:
    return ["score", "--input", str(archive), "--output", str(output),
            "--segmenter", checkpoints["segmenter"], "--classifier", checkpoints["classifier"],
            "--no-heatmaps", *extra]


def _archive(sample_dir: Path, root: Path) -> list[str]:
    root.mkdir(parents=True)
    paths = sorted((sample_dir / "images").glob("*.jpg"))[:3]
    for path in paths:
        shutil.copy(path, root / path.name)
    return [p.stem for p in paths]


def test_an_output_locked_by_another_run_exits_75(tiny_checkpoints, sample_dir, tmp_path):
    from raysky.score.lock import locked

    _archive(sample_dir, tmp_path / "archive")
    output = tmp_path / "results"
    with locked(str(output), "20250101T000000-first1"):
        done = _raysky(*_score_args(tmp_path / "archive", output, tiny_checkpoints),
                       cwd=tmp_path)
    assert done.returncode == EXIT_TEMPFAIL, done.stderr
    assert "busy" in done.stderr and "20250101T000000-first1" in done.stderr


def test_a_finished_run_that_still_has_transient_errors_exits_75(tiny_checkpoints, sample_dir,
                                                                  tmp_path):
    """Every input has a row, one of them a transient error the run was told not to retry:
    done for now, but worth running again."""
    from raysky.results.columns import output_schema
    from raysky.score import ScoreSettings
    from raysky.score.output import check_run_config
    from raysky.score.pipeline import RUN_CONFIG, _model_facts
    from tests.helpers import result_row

    ids = _archive(sample_dir, tmp_path / "archive")
    output = tmp_path / "results"
    settings = ScoreSettings(input=str(tmp_path / "archive"), output=str(output), heatmaps=False,
                             **tiny_checkpoints)
    facts = _model_facts(settings)
    check_run_config(str(output), RUN_CONFIG, facts)
    classes = facts["classes"]
    rows = [result_row(image_id, str(tmp_path / "archive" / f"{image_id}.jpg"), classes,
                       np.full(len(classes), 1 / len(classes)), np.zeros((4, 4), np.uint8))
            for image_id in ids[:2]]
    rows.append({**result_row(ids[2], str(tmp_path / "archive" / f"{ids[2]}.jpg"), classes,
                              error="cannot read file (AWS Error SLOW_DOWN)"),
                 "error_kind": "transient"})
    for row in rows:
        row["segmenter_version"] = facts["segmenter_version"]
        row["classifier_version"] = facts["classifier_version"]
    pq.write_table(pa.Table.from_pylist(rows, schema=output_schema(classes, False)),
                   output / "part-0.parquet")

    kept = _raysky(*_score_args(tmp_path / "archive", output, tiny_checkpoints,
                                "--no-retry-transient"), cwd=tmp_path)
    assert kept.returncode == EXIT_TEMPFAIL, kept.stdout + kept.stderr
    assert "1 inputs still failed transiently" in kept.stderr
    assert "transient errors: 1" in kept.stdout
    assert (output / "_SUCCESS").exists()  # every input has its row


def _parsers(parser):
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_help_page_prints_what_it_means():
    """Descriptions are not %-formatted by argparse (help strings are), so a ``%%`` there
    reaches the user as two percent signs."""
    from raysky.cli.main import build_parser

    pages = [p.format_help() for p in _parsers(build_parser())]
    assert len(pages) > 10
    assert not [page.splitlines()[0] for page in pages if "%%" in page]
