"""The geometry the report's inline SVG plots share (no plotting library, no script): a
unit-square frame, its ticks, the legend's place beside it, and the mapping from data
coordinates in [0, 1] to pixels. Used by the ROC curves (:mod:`raysky.review.pictures`) and the
reliability diagram (:mod:`raysky.review.reliability_plot`); it imports nothing from raysky,
so either may use it without an import cycle.

Only numbers and plain text are made here: the markup is the ``unit_square`` macro of
``templates/plots.html.j2``, so the page's autoescape escapes every label once."""

from __future__ import annotations

from collections.abc import Iterable
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

    @property
    def right(self) -> int:
        """The pixel column of the frame's right edge, where the legend starts."""
        return self.left + self.side

    @property
    def ticks(self) -> tuple[float, ...]:
        """The data values labelled on both axes (every 0.2)."""
        return TICKS

    def x(self, value: float) -> float:
        """The pixel column of data ``value`` (0 at the frame's left edge)."""
        return self.left + value * self.side

    def y(self, value: float) -> float:
        """The pixel row of data ``value`` (0 at the frame's bottom edge, as in a plot)."""
        return self.top + (1 - value) * self.side

    def point(self, x: float, y: float) -> str:
        """The data point ``(x, y)`` as an SVG ``points`` entry."""
        return f"{self.x(x):.1f},{self.y(y):.1f}"

    def polyline(self, xs: Iterable[float], ys: Iterable[float]) -> str:
        """The data points ``zip(xs, ys)`` as an SVG ``points`` attribute (numbers only)."""
        return " ".join(self.point(x, y) for x, y in zip(xs, ys, strict=True))

    def legend_y(self, i: int) -> int:
        """The pixel row of legend entry ``i`` (from the top)."""
        return self.top + 10 + 16 * i


@dataclass(frozen=True)
class Dot:
    """A marker at pixel ``(x, y)`` of radius ``r``, with a hover ``title`` (plain text)."""

    x: float
    y: float
    r: float
    title: str


@dataclass(frozen=True)
class Curve:
    """One line of a plot: its pixel ``points`` (an SVG ``points`` value), colour, stroke width,
    ``legend`` text (plain, escaped by the template) and optional markers."""

    points: str
    color: str
    width: float
    legend: str
    dots: tuple[Dot, ...] = ()


@dataclass(frozen=True)
class SquarePlot:
    """Everything the ``unit_square`` macro draws: the frame's geometry, the accessible
    ``label``, the two axis titles, light grid lines when ``grid``, and the curves."""

    square: UnitSquare
    label: str
    x_title: str
    y_title: str
    curves: tuple[Curve, ...]
    grid: bool = False
