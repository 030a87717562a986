"""The process's one torch thread: every caller's model work lands on the same OS thread."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from raysky.models.runtime import TORCH_THREAD_NAME, on_torch_thread, set_torch_threads


def _thread_name() -> str:
    return threading.current_thread().name


def test_calls_from_any_thread_run_on_one_torch_thread():
    with ThreadPoolExecutor(max_workers=4) as callers:
        names = set(callers.map(lambda _: on_torch_thread(_thread_name), range(8)))
    assert len(names) == 1 and names.pop().startswith(TORCH_THREAD_NAME)


def test_nested_calls_run_inline_instead_of_deadlocking():
    inner = on_torch_thread(lambda: on_torch_thread(_thread_name))
    assert inner.startswith(TORCH_THREAD_NAME)


def test_results_and_exceptions_come_back_to_the_caller():
    assert on_torch_thread(torch.add, torch.ones(2), 1).tolist() == [2.0, 2.0]
    with pytest.raises(ZeroDivisionError):
        on_torch_thread(lambda: 1 / 0)


def test_thread_count_applies_on_the_torch_thread():
    before = torch.get_num_threads()
    try:
        assert on_torch_thread(set_torch_threads, 1) == 1
        assert on_torch_thread(torch.get_num_threads) == 1
    finally:
        on_torch_thread(set_torch_threads, before)
        set_torch_threads(before)


def _fake_clock(cost: dict[str, float]):
    """A step and a timer where each step of a precision takes ``cost[precision]`` seconds."""
    now = [0.0]
    calls: list[str] = []

    def step(precision: str) -> None:
        calls.append(precision)
        now[0] += cost[precision]

    return step, (lambda: now[0]), calls


def test_auto_precision_keeps_the_faster_measured_step():
    import torch

    from raysky.models.runtime import choose_precision

    cpu = torch.device("cpu")
    step, timer, calls = _fake_clock({"fp32": 1.0, "bf16": 0.8})
    precision, medians = choose_precision("auto", cpu, step, has_bf16=True, timer=timer)
    assert precision == "bf16"
    assert medians == pytest.approx({"fp32": 1.0, "bf16": 0.8})
    assert calls.count("bf16") == calls.count("fp32") == 4  # one warm-up, three timed
    step, timer, _ = _fake_clock({"fp32": 1.0, "bf16": 1.76})  # DenseNet201's measured ratio
    assert choose_precision("auto", cpu, step, has_bf16=True, timer=timer)[0] == "fp32"
    step, timer, _ = _fake_clock({"fp32": 1.0, "bf16": 0.97})  # within the margin: not worth it
    assert choose_precision("auto", cpu, step, has_bf16=True, timer=timer)[0] == "fp32"
    # Without bf16 instructions, or when asked for a precision, nothing is measured.
    step, timer, calls = _fake_clock({"fp32": 1.0, "bf16": 0.1})
    assert choose_precision("auto", cpu, step, has_bf16=False, timer=timer) == ("fp32", {})
    assert choose_precision("bf16", cpu, step, timer=timer) == ("bf16", {})
    assert calls == []


def test_cpu_bf16_detection_reads_the_flags(tmp_path):
    from raysky.models.runtime import cpu_has_bf16

    (tmp_path / "avx2").write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    (tmp_path / "bf16").write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert not cpu_has_bf16(str(tmp_path / "avx2"))
    assert cpu_has_bf16(str(tmp_path / "bf16"))
    assert not cpu_has_bf16(str(tmp_path / "missing"))
