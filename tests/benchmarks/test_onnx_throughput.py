"""benchmarks/onnx_throughput.py on ``tiny``, so the ONNX Runtime speed figure cannot rot: the
whole pipeline and each network alone are timed on both engines, and each row's ratio is the
ORT rate over the PyTorch rate measured in the same run."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark

PARTS = ("pipeline", "segmenter", "classifier")


@pytest.mark.slow
def test_each_part_is_timed_on_both_engines_and_reported_as_a_ratio(sample_dir, capsys):
    onnx_throughput = load_benchmark("onnx_throughput")
    assert onnx_throughput.main(["--data", str(sample_dir / "images"), "--preset", "tiny",
                                 "--weights", "none", "--repeats", "1", "--batch-size", "8",
                                 "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "35 images" in lines[0] and "export of both models" in lines[0]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[2:]}
    assert tuple(rows) == PARTS
    for torch_rate, ort_rate, ratio in rows.values():
        assert torch_rate > 0 and ort_rate > 0
        assert ratio == pytest.approx(ort_rate / torch_rate, rel=0.01, abs=0.01)  # printed rounded
