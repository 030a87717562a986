"""benchmarks/gpu_check.py's CPU fallback on ``tiny``, so the GPU check cannot rot before a
GPU runs it: every configuration produces a row with its figures, bf16 is compared against
fp32, and a failing configuration (out of memory) is reported in its row, not fatal."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import load_benchmark


@pytest.mark.slow
def test_cpu_fallback_on_tiny_reports_every_configuration(tmp_path, capsys):
    gpu_check = load_benchmark("gpu_check")
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--device", "cpu", "--preset", "tiny", "--steps", "2",
                           "--warmup", "0", "--train-batch", "2", "--predict-batch", "2",
                           "--threads", "2", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu" and figures["peak_bf16_tflops"] is None
    names = [row["config"] for row in figures["rows"]]
    assert names == [f"tiny {work} {mode}" for mode in ("fp32", "bf16+cl")
                     for work in ("train segmenter", "train classifier", "predict+gradcam")]
    for row in figures["rows"]:
        assert row["error"] is None, row
        assert row["images_per_s"] > 0 and row["flops_per_step"] > 0 and row["tflops"] > 0
        assert row["peak_fraction"] is None and row["peak_memory_gib"] is None  # CPU: no table
    compared = {entry["config"]: entry for entry in figures["bf16_vs_fp32"]}
    assert set(compared) == {"tiny train segmenter", "tiny train classifier",
                             "tiny predict+gradcam"}
    # bf16 rounds, so the answers differ a little, never a lot.
    assert 0 <= compared["tiny predict+gradcam"]["max_prob_diff"] < 0.1
    assert compared["tiny train classifier"]["first_loss_diff"] < 0.1
    assert "speed-up" in capsys.readouterr().out


def test_an_out_of_memory_configuration_is_reported_and_the_check_goes_on(capsys):
    gpu_check = load_benchmark("gpu_check")

    def too_big() -> dict:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    row = gpu_check.run_config("paper train classifier bf16+cl", torch.device("cpu"), too_big)
    assert row["error"].startswith("out of memory: CUDA out of memory")
    failed = gpu_check.run_config("x", torch.device("cpu"), lambda: 1 / 0)
    assert failed["error"].startswith("ZeroDivisionError")
    assert "FAILED" in capsys.readouterr().out
    assert gpu_check.compare([row, failed]) == []


def test_peak_table_matches_card_names_most_specific_first():
    gpu_check = load_benchmark("gpu_check")
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_bf16_tflops("NVIDIA A10G") == 125.0
    assert gpu_check.peak_bf16_tflops("NVIDIA L4") == 121.0
    assert gpu_check.peak_bf16_tflops("NVIDIA L40S") == 362.0
    assert gpu_check.peak_bf16_tflops("Tesla T4") is None
