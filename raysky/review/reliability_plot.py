"""The reliability diagram of ``raysky report``, as plain data for the ``calibration`` macro of
``templates/sections.html.j2`` (inline SVG, no plotting library, no script): pixel positions,
colours and text here, markup and escaping in the template."""

from __future__ import annotations

from collections.abc import Sequence

from raysky.calibration.evaluation import referral_intervals
from raysky.metrics.intervals import format_interval
from raysky.review.svg import Curve, Dot, SquarePlot, UnitSquare

COLORS = ("#D55E00", "#0072B2")  # Okabe-Ito, as in raysky.review.pictures: before, after


def reliability_plot(curves: Sequence[tuple[str, list[dict], float]],
                     size: int = 340) -> SquarePlot:
    """Accuracy against confidence per bin, one line per ``(name, bins, ece)`` curve.

    ``bins`` are :func:`raysky.metrics.reliability.reliability_bins` rows; each point's area
    grows with its bin's count (so a bin of three images does not look as sure as one of three
    hundred), and the diagonal is perfect calibration.
    """
    square = UnitSquare(size, legend_width=190)
    total = max(1, max((sum(b["n"] for b in bins) for _, bins, _ in curves), default=1))
    drawn = []
    for i, (name, bins, ece) in enumerate(curves):
        dots = tuple(
            Dot(square.x(b["confidence"]), square.y(b["accuracy"]),
                2.0 + 8.0 * (b["n"] / total) ** 0.5,
                f"{b['n']} images, confidence {b['confidence']:.3f}, "
                f"accuracy {b['accuracy']:.3f}")
            for b in bins)
        # The line runs through the markers' centres.
        points = " ".join(f"{d.x:.1f},{d.y:.1f}" for d in dots)
        drawn.append(Curve(points, COLORS[i % len(COLORS)], 2, f"{name}  ECE {ece:.3f}", dots))
    return SquarePlot(square, "reliability diagram", "confidence (top probability)",
                      "accuracy", tuple(drawn))


def calibration_view(calibration: dict | None) -> dict | None:
    """What the report's calibration section shows, from ``evaluate``'s ``calibration`` dict:
    the temperature note, the referral figures as text, and the diagram. None when there is
    nothing to draw, so the page leaves the section out."""
    if not calibration:
        return None
    curves = [(name, calibration[key]["reliability"], calibration[key]["ece"])
              for name, key in (("uncalibrated", "before"), ("calibrated", "after"))
              if calibration.get(key) and calibration[key]["reliability"]]
    if not curves:
        return None
    note = (f"temperature {calibration['temperature']:.3f}" if calibration.get("temperature")
            else "no temperature known: only the stored probabilities are shown")
    ref = calibration.get("referral")
    referral = None
    if ref:
        sens, spec = referral_intervals(ref)
        # format_interval: the text evaluate and the model card print for the same figures.
        referral = {"threshold": _num(ref["threshold"]), "sensitivity": format_interval(sens),
                    "specificity": format_interval(spec), "interval": ref.get("interval", "")}
    return {"note": note, "referral": referral, "plot": reliability_plot(curves)}


def _num(value) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"
