"""raysky: explainable skin-lesion segmentation and classification on Ray."""

__version__ = "0.1.0"
