"""Grad-CAM heatmaps and the lesion-focus score."""

from raysky.explain.gradcam import (
    Explanation,
    GradCAMExplainer,
    cam_from_gradients,
    combine_stream_cams,
    feature_layer,
    lesion_focus,
    normalize_heatmaps,
)

__all__ = [
    "Explanation",
    "GradCAMExplainer",
    "cam_from_gradients",
    "combine_stream_cams",
    "feature_layer",
    "lesion_focus",
    "normalize_heatmaps",
]
