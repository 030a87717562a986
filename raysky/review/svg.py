"""The axes the report's inline SVG plots share (no plotting library, no script): a unit-square
frame with ticks, tick labels, axis titles and the dashed diagonal, a legend beside it, and the
mapping from data coordinates in [0, 1] to pixels. Used by the ROC curves
(:mod:`raysky.review.pictures`) and the reliability diagram (:mod:`raysky.review.reliability_plot`);
it imports nothing from raysky, so either may use it without an import cycle."""

from __future__ import annotations

import html
from dataclasses import dataclass

TICKS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class UnitSquare:
    """A ``size`` x ``size`` pixel plot of the unit square, with room at the left and bottom for
    tick labels and axis titles and a legend of width ``legend_width`` at the right."""

    size: int = 340
    legend_width: int = 170
    left: int = 44
    top: int = 12

    @property
    def side(self) -> int:
        """The frame's side in pixels."""
        return self.size - 60

    def x(self, value: float) -> float:
        """The pixel column of data ``value`` (0 at the frame's left edge)."""
        return self.left + value * self.side

    def y(self, value: float) -> float:
        """The pixel row of data ``value`` (0 at the frame's bottom edge, as in a plot)."""
        return self.top + (1 - value) * self.side

    def point(self, x: float, y: float) -> str:
        """The data point ``(x, y)`` as an SVG ``points`` entry."""
        return f"{self.x(x):.1f},{self.y(y):.1f}"

    def axes(self, label: str, x_title: str, y_title: str, grid: bool = False) -> list[str]:
        """The opening ``<svg>`` tag and the axes: frame, tick labels every 0.2 (with light
        grid lines when ``grid``), the dashed diagonal and the two axis titles. The caller adds
        its marks and closes the list with ``</svg>``."""
        x0, y0, side = self.left, self.top, self.side
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.size + self.legend_width}" '
                 f'height="{self.size}" role="img" aria-label="{html.escape(label)}">',
                 f'<rect x="{x0}" y="{y0}" width="{side}" height="{side}" fill="#fff" '
                 f'stroke="#999"/>']
        for t in TICKS:
            if grid:
                parts.append(f'<line x1="{self.x(t):.1f}" y1="{y0}" x2="{self.x(t):.1f}" '
                             f'y2="{y0 + side}" stroke="#eee"/>')
                parts.append(f'<line x1="{x0}" y1="{y0 + t * side:.1f}" x2="{x0 + side}" '
                             f'y2="{y0 + t * side:.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{self.x(t):.1f}" y="{y0 + side + 14}" font-size="10" '
                         f'text-anchor="middle">{t:.1f}</text>')
            parts.append(f'<text x="{x0 - 4}" y="{self.y(t) + 3:.1f}" font-size="10" '
                         f'text-anchor="end">{t:.1f}</text>')
        parts.append(f'<line x1="{x0}" y1="{y0 + side}" x2="{x0 + side}" y2="{y0}" stroke="#bbb" '
                     f'stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{x0 + side / 2}" y="{self.size - 6}" font-size="11" '
                     f'text-anchor="middle">{html.escape(x_title)}</text>')
        parts.append(f'<text x="12" y="{y0 + side / 2}" font-size="11" text-anchor="middle" '
                     f'transform="rotate(-90 12 {y0 + side / 2})">{html.escape(y_title)}</text>')
        return parts

    def legend(self, i: int, color: str, width: float, text: str) -> list[str]:
        """Legend entry ``i`` (from the top): a short line in the curve's colour and width and
        its ``text``, escaped here."""
        ly = self.top + 10 + 16 * i
        right = self.left + self.side
        return [f'<line x1="{right + 12}" y1="{ly}" x2="{right + 30}" y2="{ly}" '
                f'stroke="{color}" stroke-width="{width}"/>',
                f'<text x="{right + 34}" y="{ly + 4}" font-size="11">{html.escape(text)}</text>']
