"""``raysky report``: the HTML page is self-contained and renders cleanly in headless Chromium.

Results come from the real :class:`raysky.inference.LesionPipeline` (tiny untrained
checkpoints) on the bundled sample, written in the scorer's Parquet schema. The page is opened
in Chromium through the DevTools protocol, which reports console messages, exceptions and
failed loads, lets the test ask the page whether every image decoded, and takes the screenshot.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raysky.cli.main import main
from raysky.data.images import load_rgb
from raysky.data.readers import read_dataset
from tests.helpers import REPO, result_row, synthetic_rows, write_results

SCREENSHOT_COPY = Path("/tmp/raysky-report-screenshot.png")


# --------------------------------------------------------------------------------------------
# A minimal DevTools-protocol client
# --------------------------------------------------------------------------------------------


class Chromium:
    """Headless Chromium driven over the DevTools protocol (one page, flattened session)."""

    def __init__(self, user_data_dir: Path, width: int = 1280, height: int = 1600):
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        assert binary, "chromium is not installed: `make test` installs it (apt-get install chromium)"
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-quic", "--disable-dev-shm-usage", f"--window-size={width},{height}",
             f"--user-data-dir={user_data_dir}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = user_data_dir / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            assert self.proc.poll() is None, "chromium exited during start-up"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        from websockets.sync.client import connect

        self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=30)
        self.events: list[dict] = []
        self._id = 0
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]

    def send(self, method: str, params: dict | None = None, session: bool = False,
             timeout: float = 60) -> dict:
        """Send one command and wait for its answer, keeping events that arrive meanwhile."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == self._id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        """Wait for an event of type ``method`` (or return it if it already came)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.events.append(json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))))

    def page(self, method: str, params: dict | None = None) -> dict:
        return self.send(method, params, session=True)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def render(html_path: Path, screenshot: Path, user_data_dir: Path) -> dict:
    """Load ``html_path``; return console problems, image status and the page's text."""
    browser = Chromium(user_data_dir)
    try:
        for domain in ("Page", "Runtime", "Log"):
            browser.page(f"{domain}.enable")
        browser.page("Page.navigate", {"url": html_path.resolve().as_uri()})
        browser.wait_for("Page.loadEventFired")
        status = browser.page("Runtime.evaluate", {"returnByValue": True, "expression": """
            (() => {
              const imgs = [...document.images];
              return {
                total: imgs.length,
                loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
                external: imgs.filter(i => !i.src.startsWith('data:')).map(i => i.src),
                cards: document.querySelectorAll('#gallery .card').length,
                flagged: document.querySelectorAll('#flagged .card').length,
                roc_lines: document.querySelectorAll('#roc polyline').length,
                text: document.body.innerText,
                height: document.documentElement.scrollHeight,
              };
            })()"""})["result"]["value"]
        metrics = browser.page("Page.getLayoutMetrics")["cssContentSize"]
        shot = browser.page("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": metrics["width"],
                     "height": min(metrics["height"], 6000), "scale": 1}})
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        problems = [e for e in browser.events if (
            e.get("method") == "Runtime.exceptionThrown"
            or (e.get("method") == "Runtime.consoleAPICalled"
                and e["params"]["type"] in ("error", "assert"))
            or (e.get("method") == "Log.entryAdded"
                and e["params"]["entry"]["level"] == "error"))]
        return {**status, "problems": problems}
    finally:
        browser.close()


# --------------------------------------------------------------------------------------------
# Results from the real pipeline
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_results(sample_dir, tmp_path_factory):
    """Results of the tiny untrained pipeline on the sample, plus an error and a moved image."""
    import torch

    from raysky.inference import LesionPipeline
    from raysky.models import create_classifier, create_segmenter, save_checkpoint

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("report")
    save_checkpoint(create_segmenter("tiny"), str(root / "seg"), "tiny")
    save_checkpoint(create_classifier("tiny"), str(root / "cls"), "tiny")
    pipeline = LesionPipeline.from_uris(str(root / "seg"), str(root / "cls"))
    records = read_dataset(str(sample_dir), "ham10000")
    images = [np.asarray(load_rgb(r.image_uri)) for r in records]
    predictions = pipeline(images, [{"age": r.age, "sex": r.sex, "site": r.site} for r in records])
    classes = list(pipeline.classes)
    rows = [result_row(r.image_id, r.image_uri, classes, p.probabilities, p.mask, p.heatmap,
                       p.lesion_focus) for r, p in zip(records, predictions, strict=True)]
    rows[1] = result_row(records[1].image_id, records[1].image_uri, classes,
                         error="not an image")
    # An image that moved after scoring: its card must still render, from mask and heatmap.
    rows[2]["source_uri"] = str(root / "moved" / "gone.jpg")
    path = root / "results.parquet"
    write_results(str(path), rows, classes)
    return rows, path


def test_report_renders_in_chromium(pipeline_results, sample_dir, tmp_path):
    rows, path = pipeline_results
    out = tmp_path / "report.html"
    assert main(["report", "--results", str(path), "--out", str(out), "--data", str(sample_dir),
                 "--format", "ham10000", "--top", "12"]) == 0
    page = out.read_text()
    # Self-contained: every picture inline, no scripts, style sheets or fonts fetched.
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    assert "<script" not in page and "<link" not in page and "@import" not in page

    shot = tmp_path / "report.png"
    seen = render(out, shot, tmp_path / "chromium-profile")
    shutil.copyfile(shot, SCREENSHOT_COPY)  # kept for a human to look at
    assert seen["problems"] == []
    assert seen["external"] == []
    assert seen["total"] > 0 and seen["loaded"] == seen["total"]
    assert seen["cards"] == 12
    # One ROC curve per class and one for malignant versus benign.
    assert seen["roc_lines"] == 8
    for text in ("Summary", "balanced_accuracy", "threshold_jaccard", "Confusion matrix",
                 "Highest-risk lesions", "Flagged for review", "Scoring errors (1)",
                 "not an image"):
        assert text in seen["text"], text
    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape[0] > 1000 and picture.shape[1] >= 1000
    assert picture.std() > 20  # drawn content, not a blank page


def test_report_without_ground_truth_orders_and_flags(sample_dir, tmp_path):
    records, rows = synthetic_rows(sample_dir, seed=3)
    classes = [k[len("prob_"):] for k in rows[1] if k.startswith("prob_")]
    ok = [row for row in rows if row["status"] == "ok"]
    # Heatmaps are optional in the schema: this table has none.
    path = tmp_path / "results.parquet"
    write_results(str(path), rows, classes, with_heatmap=False)
    out = tmp_path / "report.html"
    assert main(["report", "--results", str(path), "--out", str(out), "--top", "5",
                 "--low-focus", "0.4"]) == 0
    page = out.read_text()
    assert 'id="metrics"' not in page and 'id="roc"' not in page
    gallery = page[page.index('id="gallery"'):page.index('id="flagged"')]
    shown = re.findall(r"<h3>(ISIC_\d+) ", gallery)
    expected = sorted(ok, key=lambda r: -r["malignant_prob"])[:5]
    assert shown == [r["image_id"] for r in expected]
    assert "Grad-CAM overlay" not in page
    flagged = page[page.index('id="flagged"'):]
    low = sorted((r for r in ok if not math.isnan(r["lesion_focus"]) and r["lesion_focus"] < 0.4),
                 key=lambda r: r["lesion_focus"])
    assert re.findall(r"<h3>(ISIC_\d+) ", flagged) == [r["image_id"] for r in low]
    assert f"Low lesion focus ({len(low)} below 0.4)" in page
    assert "truncated image" in flagged  # the failed row's message


def test_report_cli_rejects_half_ground_truth(tmp_path, sample_dir, capsys):
    assert main(["report", "--results", str(tmp_path / "x.parquet"), "--data",
                 str(sample_dir)]) == 2
    assert "--data and --format go together" in capsys.readouterr().err


def test_the_template_ships_with_the_package():
    from importlib.resources import files

    templates = files("raysky.review") / "templates"
    page = (templates / "report.html.j2").read_text()
    assert "{% include \"report.css\"" in page and (templates / "report.css").is_file()
    tomllib = pytest.importorskip("tomllib", reason="Python 3.10 has no tomllib")
    # A wheel carries only the non-Python files pyproject names: every template must match.
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["raysky.review"]
    shipped = {p.name for pattern in patterns
               for p in Path(str(files("raysky.review"))).glob(pattern)}
    assert shipped == {t.name for t in templates.iterdir() if t.is_file()}
    assert any(d.startswith("jinja2") for d in config["project"]["dependencies"])


def test_user_strings_are_escaped_and_the_plots_are_not(sample_dir, tmp_path):
    records, rows = synthetic_rows(sample_dir, seed=3)
    classes = [k[len("prob_"):] for k in rows[1] if k.startswith("prob_")]
    ok = [row for row in rows if row["status"] == "ok"]
    top = max(ok, key=lambda r: r["malignant_prob"])
    top["image_id"] = "ISIC_<script>alert(1)</script>"
    top["source_uri"] = '/gone/"><script>alert(2)</script>.jpg'
    top["ood"], top["ood_score"] = True, 0.9  # so that its source is listed too
    failed = next(row for row in rows if row["status"] != "ok")
    failed["error"] = "decoder said <script>alert(3)</script> & stopped"
    path = tmp_path / "results.parquet"
    write_results(str(path), rows, classes)
    out = tmp_path / "report.html"
    assert main(["report", "--results", str(path), "--out", str(out), "--data", str(sample_dir),
                 "--format", "ham10000", "--title", "<b>review</b>", "--top", "3"]) == 0
    page = out.read_text()
    assert "<script" not in page and "<b>review</b>" not in page
    assert "<title>&lt;b&gt;review&lt;/b&gt;</title>" in page
    # The highest-risk card leads the gallery under its escaped id; the error row keeps its text.
    gallery = page[page.index('id="gallery"'):page.index('id="flagged"')]
    assert re.findall(r"<h3>(\S+) ", gallery)[0] == "ISIC_&lt;script&gt;alert(1)&lt;/script&gt;"
    assert "decoder said &lt;script&gt;alert(3)&lt;/script&gt; &amp; stopped" in page
    assert "/gone/&#34;&gt;&lt;script&gt;alert(2)&lt;/script&gt;.jpg" in page
    # The plots and sections are template macros: real SVG and HTML elements, not escaped text.
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg"') >= 3
    assert "&lt;svg" not in page and "&lt;section" not in page
    for section in ("summary", "metrics", "calibration", "subgroups", "roc", "gallery", "flagged",
                    "ood"):
        assert f'<section id="{section}">' in page, section


# --------------------------------------------------------------------------------------------
# One escaping mechanism: every section's values are escaped exactly once, by the template
# --------------------------------------------------------------------------------------------

HOSTILE = "<script>alert(1)</script>\"&'"
ONCE = "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&amp;&#39;"  # what autoescape makes of it
TWICE = re.compile(r"&amp;(?:lt|gt|amp|quot|#\d+|#x[0-9a-f]+);")  # an escaped entity


def assert_escaped_once(html: str, occurrences: int | None = None) -> None:
    """No raw markup from the value, no entity escaped a second time, and, when given, the
    value escaped once exactly ``occurrences`` times."""
    assert "<script" not in html and HOSTILE not in html
    assert not TWICE.search(html), TWICE.search(html)
    if occurrences is not None:
        assert html.count(ONCE) == occurrences, html


def test_every_section_macro_escapes_each_value_exactly_once():
    from markupsafe import Markup

    from raysky.review.audit_plots import robustness_view, subgroup_view
    from raysky.review.pictures import roc_plot
    from raysky.review.reliability_plot import calibration_view
    from raysky.review.report import render_macro

    assert str(Markup.escape(HOSTILE)) == ONCE
    bins = [{"n": 5, "confidence": 0.6, "accuracy": 0.4},
            {"n": 9, "confidence": 0.9, "accuracy": 0.8}]
    calibration = calibration_view({
        "temperature": 1.2, "before": {"reliability": bins, "ece": 0.1},
        "referral": {"threshold": 0.4, "sensitivity": 0.9, "sensitivity_ci95": [0.8, 0.95],
                     "specificity": 0.5, "specificity_ci95": [0.4, 0.6], "interval": HOSTILE}})
    figure = {"value": 0.8, "low": 0.7, "high": 0.9}
    group = {"group": HOSTILE, "n": 10, "malignant_n": 4, "too_few": False, "flagged": True,
             "rank": 1, "balanced_accuracy": figure, "malignant_auc": figure,
             "sensitivity": {"value": None, "reason": HOSTILE}, "specificity": figure}
    audit = {"overall": {**group, "flagged": False}, "threshold": 0.4, "resampled_by": "lesion",
             "replicates": 200, "min_per_class": 5, "unavailable": {HOSTILE: HOSTILE},
             "groupings": {"g": {"column": "g", "groups": [group]}}}
    robustness = robustness_view({
        "images": 4, "data": HOSTILE, "split": HOSTILE, "masks": HOSTILE, "by_artefact": {
            HOSTILE: {"pairs": 4, "flip_rate": {"value": 0.25},
                      "mean_abs_delta_malignant_prob": 0.01,
                      "macro_auprc": {"delta": -0.02, "low": -0.05, "high": 0.01},
                      "malignant_auc": {"delta": None}, "artefact_attention": 0.2,
                      "clean_attention_same_pixels": None, "artefact_area_frac": 0.05}}},
        {HOSTILE: "data:image/jpeg;base64,AAAA"})
    roc = roc_plot([(HOSTILE, np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5)])
    # Where the value appears: the referral's interval note; the group's row header, the
    # missing sensitivity's reason in both rows, the unavailable grouping and its reason, the
    # forest plot's label and hover title; the robustness note's data, split and masks, the
    # row header, caption and alt text; the ROC legend.
    for template, macro, view, times in (
            ("sections.html.j2", "calibration", calibration, 1),
            ("sections.html.j2", "subgroups", subgroup_view(audit), 7),
            ("sections.html.j2", "robustness", robustness, 6),
            ("plots.html.j2", "unit_square", roc, 1)):
        html = str(render_macro(template, macro, view))
        assert_escaped_once(html, times)
        if macro == "robustness":  # figures keep their formats: unsigned rates, signed deltas
            assert ("<td>0.250</td><td>0.010</td><td>-0.020 <small>[-0.050, +0.010]</small>"
                    "</td><td>-</td><td>0.200</td><td>-</td><td>0.050</td>") in html


def test_a_hostile_value_is_escaped_once_in_every_section_of_the_page(sample_dir, tmp_path):
    records, rows = synthetic_rows(sample_dir, seed=3)
    classes = [k[len("prob_"):] for k in rows[1] if k.startswith("prob_")]
    ok = [row for row in rows if row["status"] == "ok"]
    top = max(ok, key=lambda r: r["malignant_prob"])
    top["image_id"], top["ood"], top["ood_score"] = "ISIC_" + HOSTILE, True, 0.9
    for i, row in enumerate(ok):  # a subgroup (--by classifier_version) named by the value
        row["classifier_version"] = HOSTILE if i % 2 else "cls-test"
    path = tmp_path / "results.parquet"
    write_results(str(path), rows, classes)
    robust = tmp_path / "robustness"
    (robust / "examples").mkdir(parents=True)
    Image.new("RGB", (90, 30), (120, 60, 30)).save(robust / "examples" / "ruler.png")
    kind = {"pairs": 4, "flip_rate": {"value": 0.25}, "mean_abs_delta_malignant_prob": 0.01,
            "macro_auprc": {"delta": -0.02, "low": -0.05, "high": 0.01},
            "malignant_auc": {"delta": 0.01, "low": -0.02, "high": 0.03},
            "artefact_attention": 0.2, "clean_attention_same_pixels": 0.1,
            "artefact_area_frac": 0.05}
    (robust / "robustness.json").write_text(json.dumps({
        "images": 4, "data": HOSTILE, "split": "val", "masks": "ground truth",
        "by_artefact": {HOSTILE: kind},
        "examples": {HOSTILE: str(robust / "examples" / "ruler.png")}}))
    out = tmp_path / "report.html"
    assert main(["report", "--results", str(path), "--out", str(out), "--data", str(sample_dir),
                 "--format", "ham10000", "--by", "classifier_version", "--robustness",
                 str(robust), "--top", "3"]) == 0
    page = out.read_text()
    assert_escaped_once(page)
    sections = dict(re.findall(r'<section id="(\w+)">(.*?)</section>', page, re.S))
    assert set(sections) >= {"summary", "metrics", "calibration", "subgroups", "roc", "gallery",
                             "flagged", "ood", "robustness"}
    # The header (models), the card and the lists, the subgroup table, the robustness table.
    header = page[page.index("<header>"):page.index("</header>")]
    for part in (header, sections["gallery"], sections["ood"], sections["subgroups"],
                 sections["robustness"]):
        assert ONCE in part
    # The plots arrive as SVG elements, not as escaped text.
    assert "&lt;svg" not in page and page.count('<svg xmlns="http://www.w3.org/2000/svg"') == 3
