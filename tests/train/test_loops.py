"""The training loop's agreement between workers, in a real two-process gloo group (no Ray).

Each worker used to time its own step to choose bf16 or fp32 and NCHW or channels_last. Two
workers on one loaded machine can time differently; DDP then refuses the model ("params[1] ...
appears not to match strides of the same param in process 0"). Rank 0 now decides for all.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raysky.train.loops import rank_zero_choice


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        # Each rank "measured" something different; every rank must end with rank 0's.
        own = ["bf16", "channels_last"] if rank == 0 else ["fp32", "nchw"]
        results[rank] = rank_zero_choice(own, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_every_worker_takes_rank_zero_choice():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        assert dict(results) == {0: ["bf16", "channels_last"], 1: ["bf16", "channels_last"]}


def test_choice_is_kept_without_a_process_group():
    assert not dist.is_initialized()
    assert rank_zero_choice(["fp32", "nchw"], torch.device("cpu")) == ["fp32", "nchw"]

