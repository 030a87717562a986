"""The Ray Data job that computes the segmenter's lesion masks for the classifier's training set.

The classifier's lesion stream sees the background-suppressed image. At scoring time the mask
comes from the segmenter, so by default training uses the segmenter's masks too, not the
ground truth: the classifier then learns from masks with the segmenter's own errors.

Masks are computed once per segmenter version, at each image's original size (as
:class:`raysky.inference.LesionPipeline` produces them), and stored as PNGs next to the run,
under ``<run>/masks/<segmenter version>/<image id>.png``. A resumed run reuses them. Every mask
path is made by :func:`mask_uri`, which refuses an image id that would leave that folder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from raysky import storage
from raysky.data.image_errors import ImageDecodeError
from raysky.data.images import encode_png, load_rgb
from raysky.data.records import LesionRecord
from raysky.inference import binary_mask, segment_probabilities
from raysky.models.checkpoint import load_checkpoint
from raysky.models.runtime import (
    on_torch_thread,
    prepare_for_device,
    select_device,
    set_torch_threads,
)

logger = logging.getLogger(__name__)


def mask_uri(output_uri: str, image_id: str) -> str:
    """Where the mask of ``image_id`` lives under ``output_uri``; unsafe ids are a ValueError."""
    return storage.safe_join(output_uri, image_id, ".png", what="image id")


class SegmenterMasker:
    """Ray Data actor: loads the segmenter once, then writes one mask PNG per input row.

    Model work runs on the actor's one torch thread (:func:`~raysky.models.runtime.on_torch_thread`).
    """

    def __init__(self, segmenter_uri: str, output_uri: str, use_gpu: bool = False,
                 precision: str = "fp32", threads: int = 1):
        self.device = select_device(use_gpu)
        self.precision = precision
        self.output_uri = output_uri
        on_torch_thread(self._load, segmenter_uri, threads)

    def _load(self, segmenter_uri: str, threads: int) -> None:
        set_torch_threads(threads)
        loaded = load_checkpoint(segmenter_uri, expected_kind="segmenter")
        self.meta = loaded.meta
        self.model = prepare_for_device(loaded.model.eval(), self.device)

    def _masks(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Binary uint8 masks at each image's own size."""
        probs = segment_probabilities(self.model, self.meta, images, self.device,
                                      self.precision).cpu()
        return [binary_mask(prob, *image.shape[:2]) for prob, image in zip(probs, images,
                                                                            strict=True)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["image_id"]]
        images: list[np.ndarray | None] = []
        errors: list[str] = []
        for image_id, uri in zip(ids, batch["image_uri"], strict=True):
            try:
                images.append(np.asarray(load_rgb(str(uri))))
                errors.append("")
            except (ImageDecodeError, FileNotFoundError, OSError) as exc:
                # One unreadable image must not stop the job: its row carries the reason.
                images.append(None)
                errors.append(getattr(exc, "reason", None) or str(exc))
                logger.warning("no mask for %s: %s", image_id, exc)
        good = [i for i, image in enumerate(images) if image is not None]
        mask_uris = [""] * len(ids)
        if good:
            masks = on_torch_thread(self._masks, [images[i] for i in good])
            for mask, i in zip(masks, good, strict=True):
                mask_uris[i] = mask_uri(self.output_uri, ids[i])
                storage.write_bytes(mask_uris[i], encode_png(mask, mask=True))
        return {"image_id": np.asarray(ids), "mask_uri": np.asarray(mask_uris),
                "error": np.asarray(errors)}


def segmenter_masks(records: Sequence[LesionRecord], segmenter_uri: str, output_uri: str,
                    actors: int = 1, cpus_per_actor: float = 1, batch_size: int = 16,
                    use_gpu: bool = False, precision: str = "fp32", threads: int | None = None,
                    ) -> tuple[list[LesionRecord], dict[str, str]]:
    """Compute segmenter masks for ``records`` under ``output_uri``; return the updated records.

    Each actor runs ``threads`` torch threads (default: its CPUs), so that the masks of a
    training run use the threads its workers will (``threads_per_worker``).

    Returns ``(records with mask_uri pointing at the segmenter's masks, {image_id: error})``.
    Images whose mask already exists under ``output_uri`` are not recomputed. Records whose
    image cannot be decoded are left out of the returned list and listed in the errors.
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    uris = {r.image_id: mask_uri(output_uri, r.image_id) for r in records}  # checks every id first
    existing = set(storage.list_files(output_uri, suffixes=(".png",)))
    todo = [r for r in records if uris[r.image_id] not in existing]
    errors: dict[str, str] = {}
    if todo:
        rows = [{"image_id": r.image_id, "image_uri": r.image_uri} for r in todo]
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // batch_size))
        results = dataset.map_batches(
            SegmenterMasker,
            fn_constructor_kwargs={"segmenter_uri": segmenter_uri, "output_uri": output_uri,
                                   "use_gpu": use_gpu, "precision": precision,
                                   "threads": threads or max(1, int(cpus_per_actor))},
            compute=ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=cpus_per_actor,
            num_gpus=1 if use_gpu else 0,
        ).take_all()
        errors = {row["image_id"]: row["error"] for row in results if row["error"]}
    out = []
    for record in records:
        if record.image_id in errors:
            continue
        out.append(replace(record, mask_uri=uris[record.image_id]))
    return out, errors
