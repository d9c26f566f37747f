"""Gathering sharded LoRA weights: the unsharded no-op, ZeRO-3 dispatch (fake deepspeed), and real 2-process FSDP2
(``fully_shard``) and FSDP1 runs on CPU with gloo comparing gathers, write-backs, SLMC and O-LoRA to an unsharded
copy of the same model."""

from __future__ import annotations

import os
import socket
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lifealign.continual.olora import OLoRAPlugin
from lifealign.continual.slmc import SLMCPlugin
from lifealign.data.records import Task
from lifealign.models.gather import (
    ShardingError,
    canonical_name,
    full_value_for_loss,
    gathered_parameters,
    is_sharded,
    parameter_sharding,
    sharding_kind,
)
from lifealign.models.lora import gathered_lora, load_lora_state, lora_modules, lora_parameters, lora_state
from lifealign.training.plugin import PluginContext

# ----- a small LoRA model with uneven shard sizes ----------------------------------------------------------------


class Block(nn.Module):
    """``x + v(tanh(q(x)))`` with q: 8 -> 5 and v: 5 -> 8, so LoRA factors (3, 8), (5, 3), (3, 5), (8, 3) have row
    counts that two ranks split unevenly."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 5)
        self.v = nn.Linear(5, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.v(torch.tanh(self.q(x)))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build_toy_lora(seed: int = 0) -> nn.Module:
    """The same peft LoRA model (r=3, alpha=6, on q and v) for a given seed, with a random non-zero ``lora_B``."""
    torch.manual_seed(seed)
    model = get_peft_model(Toy(), LoraConfig(r=3, lora_alpha=6, target_modules=["q", "v"]))
    with torch.no_grad():
        for _, b in lora_modules(model).values():
            b.normal_(0.0, 0.5)
    return model


def shifted(state: dict[str, torch.Tensor], seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """``state`` plus seeded Gaussian noise, the same on every rank (a stand-in for a stage of training)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in sorted(state.items())}


def ctx_for(model: nn.Module, index: int, n_tasks: int = 3) -> PluginContext:
    return PluginContext(
        model=model,
        tokenizer=None,
        task=Task(f"t{index}", []),
        task_index=index,
        stage="pref",
        n_tasks=n_tasks,
    )


def assert_states_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert torch.allclose(got[k], want[k], atol=atol, rtol=0.0), (k, (got[k] - want[k]).abs().max())


def lora_a_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if ".lora_A." in k]


# ----- unsharded: a no-op ------------------------------------------------------------------------------------------


def test_canonical_name_drops_only_wrapper_components():
    assert canonical_name("a._fsdp_wrapped_module.b._checkpoint_wrapped_module.c.lora_A.default.weight") == (
        "a.b.c.lora_A.default.weight"
    )
    assert canonical_name("base_model.model.layers.0.q.lora_A.default.weight") == (
        "base_model.model.layers.0.q.lora_A.default.weight"
    )


def test_unsharded_model_is_a_no_op_on_the_real_parameters():
    model = build_toy_lora()
    assert not is_sharded(model)
    assert sharding_kind(model.parameters()) == "none"
    before = {k: (a, b) for k, (a, b) in lora_modules(model).items()}
    state = lora_state(model)
    with gathered_lora(model, modify=False), torch.no_grad():
        inside = lora_modules(model)
        for k, (a, b) in inside.items():
            assert a is before[k][0] and b is before[k][1]  # the very same parameters, not copies
            a.add_(1.0)
    # no-op: an edit persists even with modify=False, because the block edited the real parameter
    after = lora_state(model)
    for k in lora_a_keys(state):
        assert torch.equal(after[k], state[k] + 1.0)


def test_lora_state_round_trip_is_exact_on_an_unsharded_model():
    model = build_toy_lora()
    target = shifted(lora_state(model), seed=1)
    load_lora_state(model, target)
    assert_states_close(lora_state(model), target)


# ----- detection and ZeRO-3 dispatch with a fake deepspeed -------------------------------------------------------


class FakeGatheredParameters:
    """Stands in for ``deepspeed.zero.GatheredParameters``: records each call's parameters and modifier rank."""

    calls: list[tuple[list[int], int | None]] = []

    def __init__(self, params, modifier_rank=None):
        FakeGatheredParameters.calls.append(([id(p) for p in params], modifier_rank))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def fake_deepspeed(monkeypatch):
    FakeGatheredParameters.calls = []
    module = types.ModuleType("deepspeed")
    module.zero = SimpleNamespace(GatheredParameters=FakeGatheredParameters)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deepspeed", module)
    return FakeGatheredParameters.calls


def mark_as_fake_zero3(model: nn.Module) -> list[int]:
    """Give every LoRA weight a ``ds_id`` as ZeRO-3 does (values stay full, so only dispatch is tested)."""
    ids = []
    for i, (name, p) in enumerate(model.named_parameters()):
        if ".lora_" in name:
            p.ds_id = i
            ids.append(id(p))
    return ids


def test_fake_zero3_parameters_dispatch_to_gathered_parameters_with_modifier_rank(fake_deepspeed):
    model = build_toy_lora()
    lora_ids = mark_as_fake_zero3(model)
    assert is_sharded(model) and sharding_kind(model.parameters()) == "zero3"
    lora_state(model)
    load_lora_state(model, lora_state(model))
    # read: no modifier; write: rank 0 modifies and broadcasts; only the ZeRO-3 (LoRA) parameters are gathered
    assert [rank for _, rank in fake_deepspeed] == [None, None, 0]
    assert all(sorted(ids) == sorted(lora_ids) for ids, _ in fake_deepspeed)


def test_fake_zero3_slmc_snapshot_reads_and_consolidation_writes(fake_deepspeed):
    model = build_toy_lora()
    mark_as_fake_zero3(model)
    plugin = SLMCPlugin()
    plugin.before_stage(ctx_for(model, 0))
    plugin.after_stage(ctx_for(model, 0))
    assert [rank for _, rank in fake_deepspeed] == [None, 0]


def test_zero3_parameters_without_deepspeed_raise(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes ``import deepspeed`` raise ImportError
    model = build_toy_lora()
    mark_as_fake_zero3(model)
    with pytest.raises(ShardingError, match="deepspeed is not installed"):
        lora_state(model)


def test_two_sharding_schemes_at_once_are_refused():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    a.ds_id = 0
    b._fsdp_flattened = True
    assert (parameter_sharding(a), parameter_sharding(b)) == ("zero3", "fsdp1")
    with (
        pytest.raises(ShardingError, match="more than one scheme"),
        gathered_parameters(nn.Module(), [a, b], modify=False),
    ):
        pass


def test_full_value_for_loss_passes_plain_tensors_and_refuses_zero3():
    plain = nn.Parameter(torch.ones(2, 2))
    assert full_value_for_loss(plain) is plain
    plain.ds_id = 3
    with pytest.raises(ShardingError, match="zero3"):
        full_value_for_loss(plain)


# ----- real sharding: 2 processes, gloo, CPU ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_rank0_wins_and_modify_false_discards(model: nn.Module, rank: int) -> None:
    with gathered_lora(model, modify=True), torch.no_grad():
        for a, _ in lora_modules(model).values():
            a.fill_(rank + 1.0)  # ranks disagree on purpose
    with gathered_lora(model, modify=False), torch.no_grad():
        for a, _ in lora_modules(model).values():
            a.fill_(7.0)  # discarded on exit
    state = lora_state(model)
    for k in lora_a_keys(state):
        assert torch.equal(state[k], torch.ones_like(state[k])), k


def _check_slmc_matches_unsharded(model: nn.Module, ref: nn.Module) -> None:
    for index in range(2):
        trained = shifted(lora_state(ref), seed=10 + index)
        for m, plugin in ((model, model.slmc), (ref, ref.slmc)):
            plugin.before_stage(ctx_for(m, index))
            load_lora_state(m, trained)
            plugin.after_stage(ctx_for(m, index))
        consolidated = lora_state(ref)
        assert not all(torch.allclose(consolidated[k], trained[k]) for k in trained)  # SLMC changed the adapter
        assert_states_close(lora_state(model), consolidated, atol=1e-6)


def _check_forward_matches(model: nn.Module, ref: nn.Module, forward: nn.Module) -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(forward(x), ref(x), atol=1e-5)


def _fsdp2_scenario(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ref, model = build_toy_lora(), build_toy_lora()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.base_model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert is_sharded(model) and sharding_kind(model.parameters()) == "dtensor"
    a0 = next(iter(lora_parameters(model).values()))
    assert a0.to_local().shape[0] < a0.shape[0]  # really sharded: the local slice has fewer rows

    assert_states_close(lora_state(model), lora_state(ref))  # same keys, same full values on every rank
    with gathered_lora(model, modify=False):
        for (ka, (a, b)), (kr, (ra, rb)) in zip(sorted(lora_modules(model).items()), sorted(lora_modules(ref).items())):
            assert ka == kr and torch.equal(a, ra) and torch.equal(b, rb)
    _check_rank0_wins_and_modify_false_discards(model, rank)

    load_lora_state(model, lora_state(ref))
    model.slmc, ref.slmc = SLMCPlugin(), SLMCPlugin()
    _check_slmc_matches_unsharded(model, ref)
    _check_forward_matches(model, ref, model)

    # O-LoRA: fold (gathered, modify), merged deltas (gathered, read), penalty and its gradient (full_tensor)
    olora_s, olora_r = OLoRAPlugin(), OLoRAPlugin()
    olora_s.after_task(ctx_for(model, 0))
    olora_r.after_task(ctx_for(ref, 0))
    assert_states_close(lora_state(model), lora_state(ref))
    deltas_s, deltas_r = olora_s.merged_deltas(model), olora_r.merged_deltas(ref)
    assert_states_close(deltas_s, deltas_r, atol=1e-6)
    _check_forward_matches(model, ref, model)
    loss_s = olora_s.extra_loss(ctx_for(model, 1), {}, {})
    loss_r = olora_r.extra_loss(ctx_for(ref, 1), {}, {})
    assert torch.allclose(loss_s, loss_r, atol=1e-6) and float(loss_r) > 0
    loss_s.backward()
    loss_r.backward()
    grads_r = {k: p.grad for k, p in lora_parameters(ref).items()}
    for k, p in lora_parameters(model).items():
        assert torch.allclose(p.grad.full_tensor(), grads_r[k], atol=1e-6), k


def _fsdp1_scenario(rank: int, world: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    ref, model = build_toy_lora(), build_toy_lora()
    wrapped = FSDP(
        model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True, device_id=torch.device("cpu")
    )
    unwrapped = wrapped.module  # what accelerate.unwrap_model hands the plugins: the root FSDP stripped
    assert sharding_kind(unwrapped.parameters()) == "fsdp1"

    # before any forward, as the pipeline's first lora_state call; names lose "_fsdp_wrapped_module."
    assert_states_close(lora_state(unwrapped), lora_state(ref))
    _check_rank0_wins_and_modify_false_discards(unwrapped, rank)
    load_lora_state(unwrapped, lora_state(ref))
    unwrapped.slmc, ref.slmc = SLMCPlugin(), SLMCPlugin()
    _check_slmc_matches_unsharded(unwrapped, ref)
    # the root still initialises and runs forward + backward after the inner units were unsharded first
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    wrapped(x).sum().backward()
    _check_forward_matches(unwrapped, ref, wrapped)

    lone = FSDP(build_toy_lora(), use_orig_params=True, device_id=torch.device("cpu"))  # LoRA owned by the root
    with pytest.raises(ShardingError, match="outside the given module"):
        lora_state(lone.module)
    assert_states_close(lora_state(lone), lora_state(build_toy_lora()))  # the root itself: gathered


def _two_rank_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _fsdp2_scenario(rank, world)
        _fsdp1_scenario(rank, world)
    finally:
        dist.destroy_process_group()


def test_fsdp2_and_fsdp1_on_two_cpu_ranks_match_the_unsharded_model():
    """Two gloo ranks: gathered LoRA equals the unsharded copy; rank 0's edit wins; SLMC and O-LoRA on the sharded
    model give the unsharded results and forwards; FSDP1 through the unwrapped model before the first forward."""
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(2, _free_port()), nprocs=2, join=True)
