"""The documentation a newcomer finds: a README that is a map, a page per command that names
every flag its ``--help`` shows, links that lead somewhere, and a site that builds strict."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from raysky.cli.main import build_parser
from tests.helpers import REPO

DOCS = REPO / "docs"
CLI_DOCS = DOCS / "cli"
README_MAX_LINES = 150

# [text](target) or ![alt](target), skipping the target's optional "title".
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Yield ``(path, parser)`` for the parser and every sub-command below it, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    """The long flags ``--help`` lists for this parser, without ``--help`` itself."""
    return [option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"]


def _page_for(path: tuple[str, ...]) -> Path:
    """A top-level command's page; sub-commands (``export onnx``) share their parent's."""
    return CLI_DOCS / f"{path[0]}.md" if path else CLI_DOCS / "index.md"


COMMANDS = list(_commands(build_parser()))


@pytest.mark.parametrize("path,parser", COMMANDS, ids=[" ".join(p) or "raysky" for p, _ in COMMANDS])
def test_every_command_has_a_page_naming_each_of_its_flags(path, parser):
    page = _page_for(path)
    assert page.is_file(), f"`raysky {' '.join(path)}` has no page: write {page.relative_to(REPO)}"
    text = page.read_text()
    if len(path) > 1:
        assert f"raysky {' '.join(path)}" in text, f"{page.name} does not show `raysky {' '.join(path)}`"
    missing = [flag for flag in _flags(parser)
               if not re.search(rf"{re.escape(flag)}(?![\w-])", text)]
    assert not missing, f"{page.relative_to(REPO)} does not mention {missing} of `raysky {' '.join(path)}`"


def test_every_command_page_is_a_command():
    """No page for a command that is gone (the overview aside)."""
    commands = {path[0] for path, _ in COMMANDS if path}
    pages = {page.stem for page in CLI_DOCS.glob("*.md")} - {"index"}
    assert pages == commands, f"pages without a command: {pages - commands}; " \
                              f"commands without a page: {commands - pages}"


def test_the_readme_is_a_map():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it a map of at most {README_MAX_LINES} and move "
        "reference material into docs/")


def _heading_anchors(markdown: str) -> set[str]:
    """The anchors of a page's headings, slugged as both MkDocs and GitHub do for the plain
    headings these pages use (lower case, punctuation dropped, spaces to hyphens)."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", markdown), re.MULTILINE):
        text = re.sub(r"[`*_]", "", heading).strip().lower()
        anchors.add(re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", text)))
    return anchors


def _relative_links(markdown_file: Path):
    """Yield every relative link target of a Markdown file, outside code."""
    text = INLINE_CODE.sub("", FENCE.sub("", markdown_file.read_text()))
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http:, https:, mailto:
        yield target


MARKDOWN_FILES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("markdown_file", MARKDOWN_FILES,
                         ids=[str(f.relative_to(REPO)) for f in MARKDOWN_FILES])
def test_every_relative_link_resolves(markdown_file):
    broken = []
    for target in _relative_links(markdown_file):
        path_part, _, anchor = target.partition("#")
        resolved = (markdown_file.parent / path_part).resolve() if path_part else markdown_file
        if not resolved.exists():
            broken.append(f"{target} (no {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in _heading_anchors(resolved.read_text()):
            broken.append(f"{target} (no heading '#{anchor}' in {resolved.name})")
    assert not broken, f"{markdown_file.relative_to(REPO)}: broken links: {broken}"


def test_the_link_check_sees_a_broken_link(tmp_path):
    """The check above is not vacuous: it finds links, and a wrong anchor fails it."""
    (tmp_path / "a.md").write_text("# A page\n\n[b](b.md#nowhere) `[code](x.md)` [web](https://x)\n")
    (tmp_path / "b.md").write_text("# B\n\n## Somewhere\n")
    assert list(_relative_links(tmp_path / "a.md")) == ["b.md#nowhere"]
    assert "nowhere" not in _heading_anchors((tmp_path / "b.md").read_text())
    assert "somewhere" in _heading_anchors((tmp_path / "b.md").read_text())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or
                    importlib.util.find_spec("material") is None,
                    reason="needs the docs extra: pip install 'raysky[docs]'")
def test_the_site_builds_strict(tmp_path):
    """What `make docs` runs: a broken link, anchor or page missing from the nav fails it."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("index.html", "cli/score/index.html", "benchmarks/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
