"""The mask job before classifier training (``raysky.train.masks``), run in-process: the
actor's threads, its mask files and its error rows."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from raysky.models.runtime import on_torch_thread
from raysky.train.masks import SegmenterMasker


def test_masker_runs_the_threads_asked_for_and_reports_unreadable_images(
        tiny_checkpoints, sample_dir, tmp_path):
    before = on_torch_thread(torch.get_num_threads)
    images = sorted((sample_dir / "images").glob("*.jpg"))[:2]
    try:
        masker = SegmenterMasker(tiny_checkpoints["segmenter"], str(tmp_path / "masks"),
                                 threads=2)
        # The model runs on the process's torch thread, whose OpenMP team is what counts.
        assert on_torch_thread(torch.get_num_threads) == 2
        out = masker({"image_id": np.array(["a", "b", "gone"]),
                      "image_uri": np.array([*map(str, images), str(tmp_path / "gone.jpg")])})
    finally:
        on_torch_thread(torch.set_num_threads, before)
    assert list(out["error"][:2]) == ["", ""] and "gone.jpg" in out["error"][2]
    assert out["mask_uri"][2] == ""
    for uri, image in zip(out["mask_uri"][:2], images, strict=True):
        mask = np.asarray(Image.open(uri))
        assert mask.shape == np.asarray(Image.open(image)).shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
