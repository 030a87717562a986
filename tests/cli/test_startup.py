"""``raysky --help`` stays fast: building every sub-command's parser loads no heavy library.

The parsers read their defaults from light settings modules; the code that needs torch, Ray,
pandas or jinja2 is imported when a command runs. A new top-level import in a ``raysky.cli``
module (or in a module it imports) would silently cost every invocation seconds; this catches it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO

HEAVY = ("torch", "ray", "jinja2", "pandas")

_PROBE = """
import contextlib, io, json, runpy, sys
sys.argv = ["raysky", *sys.argv[1:]]
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        runpy.run_module("raysky", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "help": out.getvalue(),
                  "loaded": sorted({name.split(".")[0] for name in sys.modules})}))
"""


def _help(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_raysky_help_loads_no_heavy_library():
    result = _help("--help")
    assert result["code"] == 0
    assert "evaluate" in result["help"] and "score" in result["help"]
    assert not [name for name in HEAVY if name in result["loaded"]]


def test_subcommand_help_loads_no_heavy_library():
    for command in ("evaluate", "report", "robustness", "score", "calibrate", "demo", "train",
                    "serve", "export"):
        result = _help(command, "--help")
        assert result["code"] == 0, command
        loaded = [name for name in HEAVY if name in result["loaded"]]
        assert not loaded, f"raysky {command} --help loads {loaded}"
