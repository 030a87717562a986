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
