"""``raysky export``: results in the ISIC submission formats, or a checkpoint as ONNX."""

from __future__ import annotations

import argparse

from raysky.onnx.opsets import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET


def register(subparsers) -> None:
    """Add ``export`` with its ``isic2018``, ``isic2019`` and ``onnx`` sub-commands."""
    parser = subparsers.add_parser(
        "export", help="write results in the ISIC submission formats, or a checkpoint as ONNX",
        description="Take raysky's output elsewhere: scoring results as an ISIC 2018 / 2019 "
        "submission, or a segmenter or classifier checkpoint as an ONNX model.")
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    for name in ("isic2018", "isic2019"):
        isic = formats.add_parser(
            name, help=f"results as an {name.upper()} submission",
            description=f"Write {name.upper()}_classification.csv (image,<ISIC classes>, values "
            "in [0,1]) and <FORMAT>_segmentation/<id>_segmentation.png masks (single channel, "
            "0/255, original size) from `raysky score` results. Images with status 'error' are "
            "left out.")
        isic.add_argument("--results", required=True,
                          help="results prefix written by `raysky score`")
        isic.add_argument("--out", required=True, help="folder or s3:// prefix to write into")
        isic.set_defaults(func=run_isic)

    onnx = formats.add_parser(
        "onnx", help="a segmenter or classifier checkpoint as one ONNX model",
        description="Export a checkpoint (its weights verified against their sha256 first) as "
        "one ONNX file with a dynamic batch dimension. Its metadata (raysky.* properties) holds "
        "the input size, normalisation, classes, versions and calibration (temperature, "
        "referral threshold, decision offsets). The segmenter gives lesion_logits and "
        "lesion_prob; the classifier takes image, lesion_mask, age, sex and site (those its "
        "model uses) and gives logits, calibrated probabilities and the OOD features. The "
        "export is verified against PyTorch before it is written; an operator the opset "
        "cannot express is an error naming it. Grad-CAM is not exported (it needs autograd). "
        "Needs pip install 'raysky[onnx]'.")
    onnx.add_argument("--checkpoint", required=True, metavar="CKPT_URI",
                      help="segmenter or classifier checkpoint (local path or s3://)")
    onnx.add_argument("--out", required=True, metavar="URI",
                      help="the .onnx file to write (local path or s3://)")
    onnx.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                      choices=range(MIN_OPSET, MAX_OPSET + 1), metavar="N",
                      help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default: %(default)s)")
    onnx.set_defaults(func=run_onnx)


def run_isic(args: argparse.Namespace) -> int:
    """Run ``raysky export isic2018|isic2019``."""
    from raysky.score.export import export_results

    print(export_results(args.format, args.results, args.out).format())
    return 0


def run_onnx(args: argparse.Namespace) -> int:
    """Run ``raysky export onnx``."""
    from raysky.onnx.export import export_checkpoint

    export = export_checkpoint(args.checkpoint, args.out, opset=args.opset)
    print(export.describe())
    print(f"written to {args.out}")
    return 0
