"""Grad-CAM heatmaps and the lesion-focus score (public names load on first use, see
:mod:`raysky.exports`)."""

from __future__ import annotations

from raysky.exports import lazy_exports

_MODULES = {
    "Explanation": "gradcam", "GradCAMExplainer": "gradcam", "cam_from_gradients": "gradcam",
    "combine_stream_cams": "gradcam", "feature_layer": "gradcam", "lesion_focus": "gradcam",
    "normalize_heatmaps": "gradcam",
}
__all__ = sorted(_MODULES)
__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
