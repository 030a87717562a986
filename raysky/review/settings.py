"""What ``raysky evaluate`` and ``raysky report`` can be asked for, without the code that does it.

Light on purpose (no pandas, no jinja2): the command line builds its flags from these defaults
while ``raysky --help`` runs, and :func:`raysky.review.report.build_report` takes a
:class:`ReportOptions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from raysky.settings import setting

LOW_FOCUS_THRESHOLD = 0.5
"""Default lesion focus below which an image is flagged: most Grad-CAM evidence is off-lesion."""


@dataclass(frozen=True)
class ReportOptions:
    """What the review page shows beside the results, and how much of it."""

    top_n: int = setting(24, help="lesions in the highest-risk gallery")
    max_flagged: int = setting(48, help="most low-focus images shown")
    low_focus: float = setting(LOW_FOCUS_THRESHOLD,
                               help="lesion focus below which an image is flagged")
    title: str = setting("raysky review", help="page title")
    classifier_uri: str | None = setting(
        None, help="the classifier checkpoint the results were scored with: its temperature "
        "gives the calibration figures before and after")
    by: Sequence[str] = setting((), help="extra columns to audit subgroups by")
    robustness_dir: str | None = setting(
        None, help="the out folder of a `raysky robustness` run, whose table and example "
        "strips the page adds")

    def __post_init__(self) -> None:
        if self.top_n < 0 or self.max_flagged < 0:
            raise ValueError(f"top_n and max_flagged must be >= 0, got {self.top_n} and "
                             f"{self.max_flagged}")
        object.__setattr__(self, "by", tuple(self.by))
