"""Sharded evaluation: each rank computes a contiguous slice, every rank gets all results in order."""

import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from lifealign.evaluation.scorers.base import EvalContext, Shard, ShardError


@pytest.mark.parametrize(
    ("n", "world", "expected"),
    [
        (10, 2, [(0, 5), (5, 10)]),
        (5, 2, [(0, 3), (3, 5)]),
        (7, 3, [(0, 3), (3, 5), (5, 7)]),
        (1, 2, [(0, 1), (1, 1)]),
        (0, 2, [(0, 0), (0, 0)]),
    ],
)
def test_shard_bounds_tile_the_items_contiguously(n, world, expected):
    assert [Shard(rank, world).bounds(n) for rank in range(world)] == expected


def test_shard_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2 of 2"):
        Shard(2, 2)


def test_single_process_computes_everything_locally():
    ctx = EvalContext(model=None, tokenizer=None, data=None, eval=None)
    seen = []
    assert ctx.map_sharded([1, 2, 3], lambda part: seen.extend(part) or [x * 10 for x in part]) == [10, 20, 30]
    assert seen == [1, 2, 3]
    assert ctx.on_main(lambda: "once") == "once"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ctx = EvalContext(model=None, tokenizer=None, data=None, eval=None, shard=Shard(rank, world))
        seen: list[int] = []
        gathered = ctx.map_sharded(list(range(7)), lambda part: seen.extend(part) or [x * x for x in part])
        calls: list[int] = []
        main_value = ctx.on_main(lambda: calls.append(rank) or f"from rank {rank}")

        def fail_on_rank_1(part):
            if rank == 1:
                raise RuntimeError("boom")
            return part

        try:
            ctx.map_sharded(list(range(4)), fail_on_rank_1)
            error = None
        except ShardError as exc:
            error = str(exc)
        results[rank] = {"seen": seen, "gathered": gathered, "main": main_value, "calls": calls, "error": error}
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_the_work_and_gather_it_in_order():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        out = dict(results)
    assert out[0]["seen"] == [0, 1, 2, 3] and out[1]["seen"] == [4, 5, 6]  # each rank did only its slice
    for rank in range(world):
        assert out[rank]["gathered"] == [0, 1, 4, 9, 16, 25, 36]
        assert out[rank]["main"] == "from rank 0"  # computed on rank 0, broadcast
        assert out[rank]["error"] == "sharded evaluation failed on rank 1: RuntimeError: boom"
    assert out[0]["calls"] == [0] and out[1]["calls"] == []
