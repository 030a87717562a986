"""The training loop's agreement between workers, in a real two-process gloo group (no Ray).

Each worker used to time its own step to choose bf16 or fp32 and NCHW or channels_last. Two
workers on one loaded machine can time differently; DDP then refuses the model ("params[1] ...
appears not to match strides of the same param in process 0"). Rank 0 now decides for all.

The two ranks are started with the spawn method and report through files, so this process is
never forked: the test session holds a connected Ray driver, and a fork of it (which a default
``multiprocessing.Manager`` makes on Linux) left the driver unable to reach the actors it
started afterwards, so the next Ray Train run waited for ever.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raysky.train.loops import rank_zero_choice


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        # Each rank "measured" something different; every rank must end with rank 0's.
        own = ["bf16", "channels_last"] if rank == 0 else ["fp32", "nchw"]
        chosen = rank_zero_choice(own, torch.device("cpu"))
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(chosen))
    finally:
        dist.destroy_process_group()


def test_every_worker_takes_rank_zero_choice(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True,
             start_method="spawn")
    results = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text())
               for rank in range(world)}
    assert results == {0: ["bf16", "channels_last"], 1: ["bf16", "channels_last"]}


def test_choice_is_kept_without_a_process_group():
    assert not dist.is_initialized()
    assert rank_zero_choice(["fp32", "nchw"], torch.device("cpu")) == ["fp32", "nchw"]

