"""``raysky train segmenter|classifier``: fine-tune a model with Ray Train."""

from __future__ import annotations

import argparse
import json

from raysky.cli.options import settings_defaults
from raysky.data.readers import FORMATS
from raysky.models.config import PRESETS
from raysky.models.runtime import TRAIN_PRECISIONS
from raysky.train.settings import TrainSettings


def _common(parser: argparse.ArgumentParser) -> None:
    d = settings_defaults(TrainSettings)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="URI",
                      help="dataset root, a local folder or s3:// prefix")
    data.add_argument("--format", default=d["format"], choices=[f for f in FORMATS if f != "archive"],
                      help="dataset layout (default: %(default)s); a splits.csv at the root "
                      "(image_id,split of train/val/test) fixes the validation split, and its "
                      "test images are never trained on")
    data.add_argument("--val-fraction", type=float, default=d["val_fraction"],
                      help="validation share when there is no splits.csv; split by lesion_id "
                      "(default: %(default)s)")
    data.add_argument("--seed", type=int, default=d["seed"], help="split and init seed (default: %(default)s)")

    model = parser.add_argument_group("model and optimisation")
    model.add_argument("--preset", default=d["preset"], choices=list(PRESETS),
                       help="model sizes (default: %(default)s); see `raysky info`")
    model.add_argument("--epochs", type=int, default=d["epochs"], help="total epochs (default: %(default)s)")
    model.add_argument("--precision", choices=TRAIN_PRECISIONS, default=d["precision"],
                       help="fp32, bf16 autocast, or auto: bf16 on GPUs, and on CPUs with bf16 "
                       "instructions only when a measured step of this model is faster "
                       "(default: %(default)s)")
    recipe = parser.add_argument_group(
        "recipe", "Each defaults to the preset's recipe for this model; `raysky info` lists them.")
    recipe.add_argument("--pretrained-encoder", metavar="imagenet|none|URI",
                        help="initial encoder weights: imagenet (a weight package, else timm's "
                        "hub or cache; never a silent random start), none (random), or a "
                        "timm state dict file or s3:// URI (.safetensors or .pth)")
    recipe.add_argument("--batch-size", type=int, help="images per worker per step")
    recipe.add_argument("--lr", type=float, help="peak AdamW learning rate of the new layers")
    recipe.add_argument("--encoder-lr-scale", type=float,
                        help="the encoders' learning rate as a fraction of --lr")
    recipe.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    recipe.add_argument("--label-smoothing", type=float, help="label smoothing (classifier)")
    recipe.add_argument("--class-weight-power", type=float,
                        help="loss weight of each class is frequency**-power (classifier)")

    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--workers", type=int, default=d["workers"],
                         help="Ray Train workers, each with its own data shard (default: %(default)s)")
    cluster.add_argument("--gpu", action="store_true", help="one GPU per worker: CUDA, bf16, channels_last")
    cluster.add_argument("--cpus-per-worker", type=float, default=d["cpus_per_worker"],
                         help="CPUs reserved per worker (default: %(default)s)")
    cluster.add_argument("--threads-per-worker", type=int,
                         help="torch threads per worker (default: --cpus-per-worker); more than "
                         "the CPUs held lets a worker use cores that Ray Data's decoding leaves idle")

    run = parser.add_argument_group("run, checkpoints and resume")
    run.add_argument("--storage", default=d["storage"], metavar="URI",
                     help="where runs live, a local folder or s3:// prefix (default: %(default)s)")
    run.add_argument("--name", required=True,
                     help="run name; the run is <storage>/<name>, and running again with the same "
                     "name resumes from its latest checkpoint")
    run.add_argument("--metric", help="validation metric that picks the best checkpoint "
                     "(default: dice for the segmenter, balanced_accuracy for the classifier)")
    run.add_argument("--metric-mode", choices=("max", "min"), help="whether --metric is maximised "
                     "(default: max)")
    run.add_argument("--num-to-keep", type=int, default=d["num_to_keep"],
                     help="checkpoints kept, best by --metric plus the latest (default: %(default)s)")
    run.add_argument("--force-resume", action="store_true",
                     help="resume a run even though lr, batch size, workers or epochs differ "
                     "from the ones it was started with")
    run.add_argument("--max-failures", type=int, default=d["max_failures"],
                     help="worker failures to recover from the last checkpoint; -1 = unlimited "
                     "(default: %(default)s)")


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
    masks.add_argument("--segmenter", metavar="CKPT_URI", help="segmenter checkpoint whose masks feed "
                       "the lesion stream")
    masks.add_argument("--gt-masks", action="store_true",
                       help="use the dataset's ground-truth masks instead of a segmenter's")
    cls.add_argument("--no-metadata", action="store_true",
                     help="leave out the age/sex/site metadata branch (ablation)")
    cls.add_argument("--single-stream", action="store_true",
                     help="leave out the lesion stream and the cross-attention fusion: the full "
                     "image only (ablation)")
    cls.set_defaults(func=run, kind="classifier")


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """The :class:`raysky.train.TrainSettings` that a parsed command line describes."""
    extra = {}
    if args.kind == "classifier":
        extra = {"segmenter": args.segmenter, "use_metadata": not args.no_metadata,
                 "use_lesion_stream": not args.single_stream,
                 "mask_source": "ground-truth" if args.gt_masks else "segmenter"}
    return TrainSettings(
        data=args.data, name=args.name, format=args.format, preset=args.preset, epochs=args.epochs,
        batch_size=args.batch_size, workers=args.workers, gpu=args.gpu, storage=args.storage,
        pretrained_encoder=args.pretrained_encoder, precision=args.precision, lr=args.lr,
        encoder_lr_scale=args.encoder_lr_scale, weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing, class_weight_power=args.class_weight_power,
        force_resume=args.force_resume, val_fraction=args.val_fraction, seed=args.seed,
        num_to_keep=args.num_to_keep, metric=args.metric, metric_mode=args.metric_mode,
        max_failures=args.max_failures, cpus_per_worker=args.cpus_per_worker,
        threads_per_worker=args.threads_per_worker, **extra,
    )


def run(args: argparse.Namespace) -> int:
    """Train, then print the run, the best checkpoint and its metrics (also in result.json)."""
    from raysky.train import train_classifier, train_segmenter

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
