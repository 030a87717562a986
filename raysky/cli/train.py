"""``raysky train segmenter|classifier``: fine-tune a model with Ray Train."""

from __future__ import annotations

import argparse
import json

from raysky.cli import options
from raysky.cli.options import add_setting
from raysky.data.records import FORMATS
from raysky.models.config import LESION_BRANCHES, PRESETS
from raysky.models.runtime import TRAIN_PRECISIONS
from raysky.train.settings import TrainSettings
from raysky.train.tracking import LOCAL_STORE


def _common(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    add_setting(data, TrainSettings, "data", "--data", metavar="URI")
    add_setting(data, TrainSettings, "format", "--format",
                choices=[f for f in FORMATS if f != "archive"])
    add_setting(data, TrainSettings, "val_fraction", "--val-fraction", type=float)
    add_setting(data, TrainSettings, "seed", "--seed", type=int)

    model = parser.add_argument_group("model and optimisation")
    add_setting(model, TrainSettings, "preset", "--preset", choices=list(PRESETS))
    add_setting(model, TrainSettings, "epochs", "--epochs", type=int)
    add_setting(model, TrainSettings, "precision", "--precision", choices=TRAIN_PRECISIONS)
    recipe = parser.add_argument_group(
        "recipe", "Each defaults to the preset's recipe for this model; `raysky info` lists them.")
    add_setting(recipe, TrainSettings, "pretrained_encoder", "--pretrained-encoder",
                metavar="imagenet|none|URI")
    add_setting(recipe, TrainSettings, "batch_size", "--batch-size", type=int)
    add_setting(recipe, TrainSettings, "lr", "--lr", type=float)
    add_setting(recipe, TrainSettings, "encoder_lr_scale", "--encoder-lr-scale", type=float)
    add_setting(recipe, TrainSettings, "weight_decay", "--weight-decay", type=float)
    add_setting(recipe, TrainSettings, "label_smoothing", "--label-smoothing", type=float)
    add_setting(recipe, TrainSettings, "class_weight_power", "--class-weight-power", type=float)
    add_setting(recipe, TrainSettings, "artefact_consistency", "--artefact-consistency",
                type=float)

    cluster = parser.add_argument_group("cluster")
    add_setting(cluster, TrainSettings, "workers", "--workers", type=int)
    add_setting(cluster, TrainSettings, "gpu", "--gpu", action="store_true")
    add_setting(cluster, TrainSettings, "cpus_per_worker", "--cpus-per-worker", type=float)
    add_setting(cluster, TrainSettings, "threads_per_worker", "--threads-per-worker", type=int)

    run = parser.add_argument_group("run, checkpoints and resume")
    add_setting(run, TrainSettings, "storage", "--storage", metavar="URI")
    add_setting(run, TrainSettings, "name", "--name")
    add_setting(run, TrainSettings, "metric", "--metric")
    add_setting(run, TrainSettings, "metric_mode", "--metric-mode", choices=("max", "min"))
    add_setting(run, TrainSettings, "num_to_keep", "--num-to-keep", type=int)
    add_setting(run, TrainSettings, "force_resume", "--force-resume", action="store_true")
    add_setting(run, TrainSettings, "max_failures", "--max-failures", type=int)

    tracking = parser.add_argument_group(
        "experiment tracking", "Rank 0 logs the settings, the machine and every epoch's metrics "
        "to MLflow (pip install 'raysky[mlflow]'); an unreachable store is a warning.")
    add_setting(tracking, TrainSettings, "mlflow", "--mlflow", nargs="?", const=LOCAL_STORE,
                metavar="URI", note=f"--mlflow alone: {LOCAL_STORE} in this folder, with "
                "artifacts in ./mlruns (what `mlflow ui` opens here)")
    add_setting(tracking, TrainSettings, "mlflow_experiment", "--mlflow-experiment",
                metavar="NAME")


def register(subparsers) -> None:
    """Add the ``train`` sub-command with its ``segmenter`` and ``classifier`` sub-commands."""
    parser = subparsers.add_parser(
        "train", help="fine-tune the segmenter or the classifier with Ray Train",
        description="Fine-tune a model with Ray Train: DDP over --workers, Ray Data decoding and "
        "augmentation on CPU, per-epoch validation, checkpoints to a local folder or S3, resume by "
        "--name and recovery from worker failures. Train the segmenter first: the classifier's "
        "lesion stream uses its masks.")
    kinds = parser.add_subparsers(dest="model", metavar="MODEL", required=True)

    seg = kinds.add_parser(
        "segmenter", help="train the Deep-UNet lesion segmenter",
        description="Train the Deep-UNet segmenter on the dataset's ground-truth masks. Reports "
        "Dice, Jaccard and ISIC's thresholded Jaccard every epoch.")
    _common(seg)
    seg.set_defaults(func=run, kind="segmenter")

    cls = kinds.add_parser(
        "classifier", help="train the dual-stream classifier",
        description="Train the dual-stream classifier. The lesion stream's masks come from "
        "--segmenter, computed by a Ray Data job over the training and validation images, so "
        "training sees the same kind of mask as scoring. Reports accuracy, balanced accuracy, "
        "macro and per-class AUC and loss every epoch; the loss is weighted by inverse square-root "
        "class frequency.")
    _common(cls)
    masks = cls.add_mutually_exclusive_group(required=True)
    add_setting(masks, TrainSettings, "segmenter", "--segmenter", metavar="CKPT_URI")
    masks.add_argument("--gt-masks", action="store_true",
                       help="use the dataset's ground-truth masks instead of a segmenter's")
    cls.add_argument("--no-metadata", action="store_true",
                     help="leave out the age/sex/site metadata branch (ablation)")
    lesion = cls.add_mutually_exclusive_group()
    lesion.add_argument("--single-stream", action="store_true",
                        help="leave out the lesion view and the cross-attention fusion: the full "
                        "image only (ablation)")
    add_setting(lesion, TrainSettings, "lesion_branch", "--lesion-branch",
                choices=LESION_BRANCHES)
    add_setting(cls, TrainSettings, "inference_size", "--inference-size", type=int,
                metavar="PX")
    cls.set_defaults(func=run, kind="classifier")


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """The :class:`raysky.train.TrainSettings` that a parsed command line describes."""
    extra = {}
    if args.kind == "classifier":
        extra = {"use_metadata": not args.no_metadata,
                 "use_lesion_stream": not args.single_stream,
                 "mask_source": "ground-truth" if args.gt_masks else "segmenter"}
    return options.settings_from_args(TrainSettings, args, **extra)


def run(args: argparse.Namespace) -> int:
    """Train, then print the run, the best checkpoint and its metrics (also in result.json)."""
    from raysky.train.driver import train_classifier, train_segmenter

    settings = settings_from_args(args)
    result = (train_segmenter if args.kind == "segmenter" else train_classifier)(settings)
    summary = result.to_dict()
    print(f"run:             {result.run_uri}")
    print(f"best checkpoint: {result.best_checkpoint_uri}")
    print(f"summary:         {result.result_uri}")
    print(json.dumps({"run_uri": summary["run_uri"],
                      "best_checkpoint_uri": summary["best_checkpoint_uri"],
                      "metrics": summary["metrics"]}, indent=2))
    return 0
