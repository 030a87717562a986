"""Quality benchmark: fine-tune through ``raysky train``, score the val split in three framings,
evaluate, and compare the classifier's lesion views with paired, lesion-resampled intervals.

    python benchmarks/quality.py run --data ../shared/data/ham10000 --seeds 0 1
    python benchmarks/quality.py report --data ../shared/data/ham10000

``run`` trains, per seed, one segmenter and one classifier per arm, each with the product's own
path (``train_segmenter`` / ``train_classifier``, what ``raysky train`` calls; one Ray Train
worker, the preset's recipe, only ``--epochs`` set), then scores the val split with
``score_archive`` (``raysky score``) using the run's last checkpoint (not the best epoch, which
would be chosen on the very images it is measured on). Arms:

* ``shared``: one encoder, the lesion view pooled from its feature map with the mask (``lite``'s
  default);
* ``encoder``: the paper's second encoder on the background-suppressed image, given half the
  epochs, since it costs twice the compute per epoch (the same wall-time budget);
* ``single``: the full image only.

Each classifier's val split is scored four ways: the 200x150 images with the metadata CSV (with
Grad-CAM, for the lesion focus), the same without metadata, 600x450 renderings (3x bicubic
upscales, standing in for the originals the shared subset lacks), and tight 224x224 crops round
the ground-truth lesion box (10% margin) cut from those. ``--views frame200_tta`` also scores
the frames with test-time augmentation (``raysky score --tta``), and ``frame200_at176`` /
``frame200_at192`` with the classifier run at that input size, for runs already trained too.
Every run is written to ``<out>/runs.json`` as it finishes, so a long benchmark that stops keeps
what it measured.

``report`` reads what ``run`` wrote and prints, per arm, the mean over seeds and each seed's
figures with 95% bootstrap intervals resampled by lesion: balanced accuracy (argmax, and with
decision offsets cross-fitted on lesion-disjoint halves of val), macro AUC, thresholded Jaccard,
the three framings, without metadata, with TTA where scored, each class's AUC with the number
of val lesions behind it, and the median lesion focus; then paired bootstrap
intervals of each arm's balanced-accuracy difference to the default arm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysky.data.images import load_mask, load_rgb  # noqa: E402
from raysky.models.checkpoint import CONFIG_FILE, save_version  # noqa: E402
from raysky.score import ScoreSettings, score_archive  # noqa: E402
from raysky.train import TrainSettings, train_classifier, train_segmenter  # noqa: E402
from raysky.train.datasets import load_splits  # noqa: E402

ARMS = {
    "shared": {"lesion_branch": "shared"},
    "encoder": {"lesion_branch": "encoder"},
    "single": {"use_lesion_stream": False},
    # shared, plus the artefact-consistency loss at AugMix's order of weight (not tuned)
    "consistency": {"lesion_branch": "shared", "artefact_consistency": 10.0},
}
RENDERINGS = ("frame200", "frame600", "crop224")
CROP_MARGIN = 0.10
TARGETS = {"balanced_accuracy": 0.72, "auc": 0.94, "threshold_jaccard": 0.80}
TRAINING_BUDGET_S = 60 * 60


def _write_jpeg(image, path: Path) -> None:
    image.save(path, format="JPEG", quality=95)


def lesion_crop_box(mask: np.ndarray, width: int, height: int, margin: float = CROP_MARGIN
                    ) -> tuple[int, int, int, int]:
    """A square box round the mask's lesion with ``margin`` of its side each way, inside the
    image (scaled from the mask's size to ``width`` x ``height``); the centre square without a
    lesion."""
    ys, xs = np.nonzero(mask)
    sy, sx = height / mask.shape[0], width / mask.shape[1]
    if not len(xs):
        side = min(width, height)
        return ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)
    x0, x1, y0, y1 = xs.min() * sx, (xs.max() + 1) * sx, ys.min() * sy, (ys.max() + 1) * sy
    side = min(max(x1 - x0, y1 - y0) * (1 + 2 * margin), width, height)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, left + int(round(side)), top + int(round(side))


def render_val(val, out: Path) -> dict[str, str]:
    """The val images in the three framings (folders of JPEGs) and the metadata CSV."""
    from PIL import Image

    folders = {name: out / "val" / name for name in RENDERINGS}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for record in val:
        name = f"{record.image_id}.jpg"
        link = folders["frame200"] / name
        if not link.exists():
            link.symlink_to(os.path.abspath(record.image_uri))
        if (folders["crop224"] / name).exists():
            continue
        image = load_rgb(record.image_uri)
        large = image.resize((image.width * 3, image.height * 3), Image.BICUBIC)
        _write_jpeg(large, folders["frame600"] / name)
        mask = load_mask(record.mask_uri) if record.mask_uri else np.zeros((2, 2), np.uint8)
        box = lesion_crop_box(mask, large.width, large.height)
        _write_jpeg(large.crop(box).resize((224, 224), Image.BICUBIC), folders["crop224"] / name)
    metadata = out / "val" / "metadata.csv"
    lines = ["image_id,age,sex,localization"]
    lines += [f"{r.image_id},{'' if r.age is None else r.age},{r.sex or ''},{r.site or ''}"
              for r in val]
    metadata.write_text("\n".join(lines) + "\n")
    return {**{k: str(v) for k, v in folders.items()}, "metadata": str(metadata)}


class Runs:
    """``<out>/runs.json``: one record per trained model, written as each finishes."""

    def __init__(self, out: Path):
        self.path = out / "runs.json"
        self.records = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, key: str, record: dict) -> None:
        self.records[key] = record
        self.path.write_text(json.dumps(self.records, indent=2, default=float))


def _timed(fn, *args):
    started = time.monotonic()
    value = fn(*args)
    return value, time.monotonic() - started


VIEWS: dict[str, dict] = {
    "frame200": {},
    "no_metadata": {"metadata": None, "heatmaps": False},
    "frame600": {"rendering": "frame600", "heatmaps": False},
    "crop224": {"rendering": "crop224", "heatmaps": False},
    "frame200_tta": {"tta": True, "heatmaps": False},
    "frame200_at176": {"classifier_input_size": 176, "heatmaps": False},
    "frame200_at192": {"classifier_input_size": 192, "heatmaps": False},
    "no_metadata_at192": {"classifier_input_size": 192, "metadata": None, "heatmaps": False},
    "frame600_at192": {"classifier_input_size": 192, "rendering": "frame600", "heatmaps": False},
    "crop224_at192": {"classifier_input_size": 192, "rendering": "crop224", "heatmaps": False},
}
"""How each val view is scored: the 200x150 frames with metadata and Grad-CAM, then the same
without metadata, the other two renderings, the frames with test-time augmentation, and the
frames with the classifier run at a larger input than it trained at (FixRes: random-resized
crops show lesions larger in training than whole frames do at the same size), and the other
three views at that larger input."""
DEFAULT_VIEWS = ("frame200", "no_metadata", "frame600", "crop224")


def _score(settings_kw: dict, output: Path, **overrides) -> str:
    if not (output / "_SUCCESS").exists():
        score_archive(ScoreSettings(output=str(output), workers=1, cpus_per_worker=2,
                                    **{**settings_kw, **overrides}))
    return str(output)


def score_views(record: dict, key: str, seg: dict, views: dict[str, str], out: Path,
                wanted: tuple[str, ...]) -> dict:
    """Score the classifier of ``record`` on each ``wanted`` view it lacks, and note each
    view's wall time (``score_view_s``), so a view added later needs no retraining."""
    results = dict(record.get("results", {}))
    seconds = dict(record.get("score_view_s", {}))
    score = {"input": views["frame200"], "segmenter": seg["checkpoint"],
             "classifier": record["checkpoint"], "metadata": views["metadata"]}
    for view in wanted:
        if view in results:
            continue
        overrides = dict(VIEWS[view])
        rendering = overrides.pop("rendering", None)
        if rendering:
            overrides["input"] = views[rendering]
        size = overrides.pop("classifier_input_size", None)
        if size:
            overrides["classifier"] = _resized(record["checkpoint"], size,
                                               out / "resized" / f"{key}-{size}")
        started = time.monotonic()
        results[view] = _score(score, out / "results" / key / view.replace("_", "-"),
                               **overrides)
        seconds[view] = time.monotonic() - started
    return {**record, "results": results, "score_view_s": seconds}


def _resized(checkpoint: str, size: int, target: Path) -> str:
    """A copy of the classifier at ``checkpoint`` that scoring runs at ``size`` px (the
    weights are the same; its pooling makes the network size-agnostic)."""
    if not (target / CONFIG_FILE).exists():
        save_version(checkpoint, str(target), {"input_size": size})
    return str(target)


def run_seed(args, seed: int, views: dict[str, str], runs: Runs, out: Path) -> None:
    """Train this seed's segmenter and one classifier per arm, and score each on every view
    asked for; a run already trained is only scored, with the segmenter it was trained with."""
    common = {"data": args.data, "format": args.format, "preset": args.preset, "workers": 1,
              "cpus_per_worker": 1, "threads_per_worker": args.threads, "storage": str(out),
              "progress_interval": 60.0, "seed": seed}
    seg_key = f"seg-s{seed if args.segmenter_seed is None else args.segmenter_seed}"
    for arm in args.arms:
        key = f"cls-{arm}-s{seed}"
        record = runs.get(key)
        if record is None:
            record = _train_arm(args, arm, key, _segmenter(seg_key, runs, common, args), seg_key,
                                common)
            print(f"[{key}] trained in {record['wall_s'] / 60:.1f} min; last epoch: "
                  f"{_short(record['history'][-1] if record['history'] else {})}", flush=True)
            runs.put(key, record)  # a run stopped while scoring keeps the trained model
        started = time.monotonic()
        record = score_views(record, key, runs.get(record["segmenter"]), views, out,
                             (*DEFAULT_VIEWS, *args.views))
        record.setdefault("score_s", time.monotonic() - started)
        runs.put(key, record)


def _segmenter(seg_key: str, runs: Runs, common: dict, args) -> dict:
    """The record of segmenter ``seg_key``, trained first if ``runs`` lacks it."""
    seg = runs.get(seg_key)
    if seg is None:
        result, wall = _timed(train_segmenter, TrainSettings(
            **{**common, "seed": int(seg_key.removeprefix("seg-s"))}, name=seg_key,
            epochs=args.seg_epochs))
        seg = {"checkpoint": result.latest_checkpoint_uri, "wall_s": wall,
               "metrics": result.history[-1] if result.history else {}}
        runs.put(seg_key, seg)
    return seg


def _train_arm(args, arm: str, key: str, seg: dict, seg_key: str, common: dict) -> dict:
    epochs = args.cls_epochs
    if arm == "encoder" and epochs:
        epochs = max(1, epochs // 2)
    result, wall = _timed(train_classifier, TrainSettings(
        **common, name=key, epochs=epochs, segmenter=seg["checkpoint"], **ARMS[arm]))
    return {"arm": arm, "seed": int(common["seed"]), "epochs": len(result.history),
            "checkpoint": result.latest_checkpoint_uri, "segmenter": seg_key, "wall_s": wall,
            "results": {}, "history": result.history}


def _short(metrics: dict) -> str:
    keys = ("balanced_accuracy", "auc", "dice", "threshold_jaccard", "images_per_s")
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float))


def run(args) -> int:
    """Train and score everything ``report`` reads."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _train, val, how = load_splits(args.data, args.format)
    print(f"split: {how}; val {len(val)}; preset {args.preset}; seeds {args.seeds}; "
          f"arms {args.arms}", flush=True)
    views = render_val(val, out)
    runs = Runs(out)
    for seed in args.seeds:
        run_seed(args, seed, views, runs, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``run`` or ``report``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "report"):
        sub = commands.add_parser(name)
        sub.add_argument("--data", required=True, help="HAM10000-layout folder (with splits.csv)")
        sub.add_argument("--format", default="ham10000")
        sub.add_argument("--preset", default="lite")
        sub.add_argument("--out", default="runs/quality", help="runs, results and runs.json")
        sub.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    run_parser = commands.choices["run"]
    run_parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    run_parser.add_argument("--seg-epochs", type=int, default=None,
                            help="default: the preset's recipe")
    run_parser.add_argument("--cls-epochs", type=int, default=None,
                            help="default: the preset's recipe (the encoder arm gets half)")
    run_parser.add_argument("--segmenter-seed", type=int, default=None,
                            help="every seed's classifiers use this seed's segmenter (default: "
                                 "each seed trains its own); narrows the seeds' spread to the "
                                 "classifier's")
    run_parser.add_argument("--views", nargs="*", default=[],
                            choices=[v for v in VIEWS if v not in DEFAULT_VIEWS],
                            help="extra val views to score, also for runs already trained "
                                 "(frame200_tta: the frames with --tta; frame200_atN: the "
                                 "classifier at N px)")
    run_parser.add_argument("--threads", type=int, default=2,
                            help="torch threads of the one training worker (default: 2)")
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.cls_epochs is None:
            from raysky.models.config import get_preset

            args.cls_epochs = get_preset(args.preset).classifier_recipe.epochs
        return run(args)
    from quality_report import report  # noqa: PLC0415 - the analysis half, beside this file

    return report(args)


if __name__ == "__main__":
    sys.exit(main())
