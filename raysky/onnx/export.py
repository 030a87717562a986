"""Export a raysky checkpoint as one self-describing ONNX file, verified against PyTorch.

What an export holds (see :data:`SEGMENTER_IO` and :func:`classifier_io`):

* segmenter: ``image`` (float32 ``[N, 3, S, S]``, resized and normalised with the metadata's
  ``mean``/``std``) to ``lesion_logits`` and ``lesion_prob`` (``[N, 1, S, S]``); a pixel is
  lesion where ``lesion_prob > mask_threshold``.
* classifier: ``image`` as above, ``lesion_mask`` (float32 ``[N, 1, S, S]``, 0/1, the
  segmenter's mask resized to the classifier's size) unless the model is single-stream, and
  ``age`` (float32 ``[N, 2]``: normalised age and its missing flag), ``sex`` and ``site``
  (int64 ``[N]`` indices into ``metadata_vocab``) unless it has no metadata branch; to
  ``logits`` (raw), ``probabilities`` (``softmax(logits / temperature)``, the calibrated
  probabilities when the checkpoint has a calibration) and ``features`` (the image feature
  that out-of-distribution scoring measures).

The batch dimension is dynamic. The metadata (``raysky.*`` properties of the model) carries
the normalisation, input size, classes, versions, the calibration (temperature, referral
threshold and decision offsets) and the checkpoint's whole ``config.json``, so the file alone
says how to feed it and what its outputs mean. Grad-CAM needs autograd and is not exported:
an ONNX model gives masks and class probabilities, what a screening run without heatmaps needs.

An export is checked before it is returned: ONNX's checker, then ONNX Runtime against the
PyTorch model on fresh inputs at two batch sizes. An operator the opset cannot express is an
:class:`OnnxExportError` naming the operator, and outputs further than :data:`PARITY_ATOL` from
PyTorch's are one too: never a silently different model.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from raysky import __version__, storage
from raysky.models.checkpoint import LoadedModel, load_checkpoint
from raysky.models.segmenter import MASK_THRESHOLD
from raysky.onnx.opsets import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

if TYPE_CHECKING:  # both are imported where used: exporting and scoring need them, training not
    import onnx
    import onnxruntime

FORMAT = "raysky-onnx/1"
PARITY_ATOL = 1e-4
"""Largest difference from PyTorch allowed in any probability (and, relative, in logits and
features) when an export is verified."""
META_PREFIX = "raysky."
SEGMENTER_IO = (("image",), ("lesion_logits", "lesion_prob"))


class OnnxExportError(ValueError):
    """The checkpoint cannot be exported faithfully: the message says which operator or which
    output, and by how much."""


def classifier_io(use_lesion_stream: bool, use_metadata: bool
                  ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(input names, output names)`` of a classifier's export: ``lesion_mask`` only with a
    lesion stream, ``age``/``sex``/``site`` only with a metadata branch."""
    inputs = ("image",) + (("lesion_mask",) if use_lesion_stream else ()) + (
        ("age", "sex", "site") if use_metadata else ())
    return inputs, ("logits", "probabilities", "features")


def _classifier_io(config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return classifier_io(config.use_lesion_stream, config.use_metadata)


class SegmenterGraph(nn.Module):
    """What a segmenter export computes: logits and their sigmoid."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)
        return logits, torch.sigmoid(logits)


class ClassifierGraph(nn.Module):
    """What a classifier export computes from its named inputs (see :func:`classifier_io`):
    raw logits, calibrated probabilities and the OOD image feature."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.inputs = _classifier_io(model.config)[0]
        self.temperature = float(temperature)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        named = dict(zip(self.inputs, tensors, strict=True))
        image = named["image"]
        # A single-stream model never reads the mask; any tensor of the image's shape will do.
        full_map, lesion_map = self.model.encode(image, named.get("lesion_mask", image[:, :1]))
        metadata = ({k: named[k] for k in ("age", "sex", "site")} if "age" in named else None)
        logits, features = self.model.classify_with_features(full_map, lesion_map, metadata)
        return logits, torch.softmax(logits / self.temperature, dim=1), features


def example_inputs(loaded: LoadedModel, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of the export's shapes and dtypes for ``loaded``: standard-normal images, 0/1
    masks, ages in range and every sex/site index drawn from the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    size = int(loaded.meta["input_size"])
    image = torch.randn(batch, 3, size, size, generator=generator)
    if loaded.kind == "segmenter":
        return (image,)
    model = loaded.model
    values = {"image": image,
              "lesion_mask": (torch.rand(batch, 1, size, size, generator=generator) > 0.5).float(),
              "age": torch.rand(batch, 2, generator=generator),
              "sex": torch.randint(0, len(model.vocab.sex), (batch,), generator=generator),
              "site": torch.randint(0, len(model.vocab.site), (batch,), generator=generator)}
    return tuple(values[name] for name in _classifier_io(model.config)[0])


def graph_for(loaded: LoadedModel) -> tuple[nn.Module, tuple[str, ...], tuple[str, ...]]:
    """The module to export for ``loaded``, with its input and output names."""
    if loaded.kind == "segmenter":
        return SegmenterGraph(loaded.model).eval(), *SEGMENTER_IO
    calibration = loaded.meta.get("calibration") or {}
    graph = ClassifierGraph(loaded.model, calibration.get("temperature", 1.0)).eval()
    return graph, *_classifier_io(loaded.model.config)


def missing_operator(exc: BaseException) -> str | None:
    """The operator an exporter error says has no ONNX translation (``aten.cummax``), if any."""
    while exc is not None:
        found = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", str(exc)) or \
            re.search(r"operator '([\w:.]+)' to ONNX opset version \d+ is not supported", str(exc))
        if found:
            return found.group(1)
        exc = exc.__cause__ or exc.__context__
    return None


def _batch_dynamic(module: nn.Module, count: int, batch) -> tuple:
    """``dynamic_shapes`` making dim 0 of each of ``count`` inputs ``batch``, shaped as
    ``module.forward`` takes them (one entry per parameter, a ``*args`` one a tuple)."""
    import inspect

    per_input = tuple({0: batch} for _ in range(count))
    parameters = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return (per_input,)
    return per_input


def export_module(module: nn.Module, inputs: Sequence[torch.Tensor], input_names: Sequence[str],
                  output_names: Sequence[str], opset: int = DEFAULT_OPSET, what: str = "model"
                  ) -> onnx.ModelProto:
    """``module`` as an ``onnx.ModelProto`` with a dynamic batch dimension on every input.

    An operator the exporter cannot translate at ``opset`` is an :class:`OnnxExportError`
    naming the operator and ``what``; other exporter failures keep their own message.
    """
    from torch.export import Dim

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxExportError(f"opset {opset} is not supported: use {MIN_OPSET} to {MAX_OPSET}")
    batch = Dim("batch", min=1, max=4096)
    # The exporter's optimiser logs every constant it leaves unfolded; users need none of it.
    quiet = logging.getLogger("onnxscript")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, tuple(inputs), dynamo=True, opset_version=opset, verbose=False,
                input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=_batch_dynamic(module, len(inputs), batch), external_data=False)
    except Exception as exc:
        operator = missing_operator(exc)
        if operator is None:
            raise
        raise OnnxExportError(
            f"{what}: cannot export to ONNX opset {opset} faithfully: operator {operator} has no "
            "ONNX translation (try another opset, or change the layer that uses it)") from None
    finally:
        quiet.setLevel(level)
    return program.model_proto


def session(model: bytes, threads: int = 1) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session over serialised ``model`` with ``threads`` intra-op threads.

    Set explicitly: Ray runs actors with ``OMP_NUM_THREADS=1``, and ONNX Runtime's own default
    (every core) would oversubscribe a node shared by several actors.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def verify(model: bytes, module: nn.Module, loaded: LoadedModel, input_names: Sequence[str],
           output_names: Sequence[str], what: str) -> float:
    """Run the export and PyTorch on fresh inputs (batches of 1 and 3) and return the largest
    probability difference; :class:`OnnxExportError` beyond :data:`PARITY_ATOL`."""
    runner = session(model)
    worst = 0.0
    for batch, seed in ((1, 1), (3, 2)):
        inputs = example_inputs(loaded, batch, seed)
        with torch.no_grad():
            expected = [t.numpy() for t in module(*inputs)]
        got = runner.run(list(output_names), {n: t.numpy() for n, t in zip(input_names, inputs,
                                                                             strict=True)})
        for name, want, have in zip(output_names, expected, got, strict=True):
            if want.shape != have.shape:
                raise OnnxExportError(f"{what}: the export's {name} has shape {have.shape} for a "
                                      f"batch of {batch}, PyTorch's {want.shape}")
            diff = float(np.max(np.abs(want - have))) if want.size else 0.0
            scale = 1.0 if "prob" in name else max(1.0, float(np.max(np.abs(want))))
            if not diff <= PARITY_ATOL * scale:  # also catches NaN
                raise OnnxExportError(
                    f"{what}: the export is not faithful: its {name} differs from PyTorch's by "
                    f"{diff:.3g} at a batch of {batch} (allowed {PARITY_ATOL * scale:.3g})")
            if "prob" in name:
                worst = max(worst, diff)
    return worst


def metadata(meta: dict, opset: int) -> dict[str, str]:
    """The ``raysky.*`` metadata properties of an export of the checkpoint ``meta`` describes."""
    calibration = meta.get("calibration") or {}
    props = {
        "format": FORMAT, "kind": meta["kind"], "version": meta["version"],
        "weights_sha256": meta.get("weights_sha256"), "preset": meta.get("preset"),
        "input_size": meta["input_size"], "normalization": meta["normalization"],
        "opset": opset, "raysky_version": __version__,
    }
    if meta["kind"] == "segmenter":
        props["mask_threshold"] = MASK_THRESHOLD
    else:
        props.update(classes=meta["classes"], metadata_vocab=meta.get("metadata_vocab"),
                     temperature=calibration.get("temperature", 1.0))
    if calibration:
        props.update(calibration_version=calibration.get("version"),
                     referral_threshold=(calibration.get("referral") or {}).get("threshold"))
        if calibration.get("decision_offsets") is not None:
            props["decision_offsets"] = calibration["decision_offsets"]
    props["checkpoint"] = meta
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v)
            for k, v in props.items() if v is not None}


@dataclass
class OnnxExport:
    """One verified export: the serialised model and what was checked."""

    model: bytes
    meta: dict
    opset: int
    max_probability_diff: float
    seconds: float
    inputs: tuple[str, ...] = field(default_factory=tuple)
    outputs: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """One line for the command line."""
        return (f"{self.meta['kind']} {self.meta['version']} -> ONNX opset {self.opset}, "
                f"{len(self.model) / 2**20:.1f} MiB, inputs {', '.join(self.inputs)}, outputs "
                f"{', '.join(self.outputs)}; verified against PyTorch (largest probability "
                f"difference {self.max_probability_diff:.1e}) in {self.seconds:.0f} s")


def export_loaded(loaded: LoadedModel, opset: int = DEFAULT_OPSET, what: str = "model") -> OnnxExport:
    """Export and verify an already loaded (and hash-checked) checkpoint."""
    import onnx

    started = time.monotonic()
    module, input_names, output_names = graph_for(loaded)
    proto = export_module(module, example_inputs(loaded, 2), input_names, output_names, opset,
                          what)
    proto.doc_string = (f"raysky {loaded.kind} {loaded.version}: see the raysky.* metadata for "
                        "input size, normalisation, classes and calibration")
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                        **metadata(loaded.meta, opset)})
    onnx.checker.check_model(proto)
    model = proto.SerializeToString()
    worst = verify(model, module, loaded, input_names, output_names, what)
    return OnnxExport(model, loaded.meta, opset, worst, time.monotonic() - started,
                      tuple(input_names), tuple(output_names))


def export_checkpoint(uri: str, out: str | None = None, opset: int = DEFAULT_OPSET,
                      expected_kind: str | None = None) -> OnnxExport:
    """Export the checkpoint at ``uri`` (local or ``s3://``) and write it to ``out`` if given.

    The weights are verified against their sha256 first, as scoring does
    (:class:`~raysky.models.checkpoint.CheckpointIntegrityError` otherwise).
    """
    loaded = load_checkpoint(uri, expected_kind)
    export = export_loaded(loaded, opset, what=str(uri))
    if out is not None:
        storage.write_bytes(out, export.model)
    return export


def read_metadata(model: bytes) -> dict:
    """The ``raysky.*`` metadata of a serialised export, values decoded (``checkpoint`` is the
    exported checkpoint's ``config.json``)."""
    import onnx

    proto = onnx.load_model_from_string(model)
    props = {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props
             if p.key.startswith(META_PREFIX)}
    if props.get("format") != FORMAT:
        raise ValueError(f"not a raysky ONNX export (format {props.get('format')!r}, "
                         f"expected {FORMAT})")
    return {k: v if k in ("format", "kind", "version", "weights_sha256", "preset",
                          "raysky_version", "calibration_version") else json.loads(v)
            for k, v in props.items()}
