"""The shared geometry of the report's SVG plots (raysky.review.svg), the ``unit_square`` macro
of ``templates/plots.html.j2`` that draws it, and the two plots drawn on it."""

from __future__ import annotations

import re

import numpy as np

from raysky.review.pictures import roc_plot
from raysky.review.reliability_plot import reliability_plot
from raysky.review.report import render_macro
from raysky.review.svg import SquarePlot, UnitSquare


def _draw(plot: SquarePlot) -> str:
    return str(render_macro("plots.html.j2", "unit_square", plot))


def test_the_unit_square_maps_data_corners_to_the_frame():
    square = UnitSquare(340, legend_width=170)
    assert square.side == 280 and square.right == 324
    assert (square.x(0), square.y(0)) == (44, 292)  # bottom left
    assert (square.x(1), square.y(1)) == (324, 12)  # top right
    assert square.point(0.5, 0.25) == "184.0,222.0"
    assert square.polyline([0.0, 0.5], [0.0, 0.25]) == "44.0,292.0 184.0,222.0"
    assert [square.legend_y(i) for i in range(3)] == [22, 38, 54]


def test_the_macro_draws_the_axes_and_escapes_the_titles():
    square = UnitSquare(340, legend_width=170)
    parts = _draw(SquarePlot(square, "a <plot>", "x & more", "y", ()))
    assert parts.startswith('<svg xmlns="http://www.w3.org/2000/svg" width="510" height="340"')
    assert 'aria-label="a &lt;plot&gt;"' in parts and ">x &amp; more</text>" in parts
    assert re.findall(r'text-anchor="middle">(\d\.\d)</text>', parts) == [
        "0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert 'stroke="#eee"' not in parts
    assert '<text x="12" y="152.0" font-size="11" text-anchor="middle" ' \
           'transform="rotate(-90 12 152.0)">y</text>' in parts
    gridded = _draw(SquarePlot(square, "a", "x", "y", (), grid=True))
    assert gridded.count('stroke="#eee"') == 12  # six vertical, six horizontal


def test_roc_and_reliability_share_the_frame_and_escape_their_legends():
    roc = _draw(roc_plot([("a<b", np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.9, 1.0]), 0.8)]))
    bins = [{"n": 4, "confidence": 0.5, "accuracy": 0.25}]
    reliability = _draw(reliability_plot([("before & after", bins, 0.1)]))
    frame = '<rect x="44" y="12" width="280" height="280" fill="#fff" stroke="#999"/>'
    diagonal = '<line x1="44" y1="292" x2="324" y2="12" stroke="#bbb" stroke-dasharray="4 3"/>'
    for svg in (roc, reliability):
        assert frame in svg and diagonal in svg and svg.rstrip().endswith("</svg>")
    assert 'points="44.0,292.0 184.0,40.0 324.0,12.0"' in roc
    assert '<line x1="336" y1="22" x2="354" y2="22" stroke="#0072B2" stroke-width="1.5"/>' in roc
    assert ">a&lt;b  AUC 0.800</text>" in roc
    assert ('<circle cx="184.0" cy="222.0" r="10.0" fill="#D55E00" fill-opacity="0.5">'
            "<title>4 images, confidence 0.500, accuracy 0.250</title></circle>") in reliability
    assert ">before &amp; after  ECE 0.100</text>" in reliability
