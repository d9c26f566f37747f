"""Full values of sharded parameters, for code that edits whole weight matrices (SLMC, O-LoRA, adapter snapshots).

Under sharded data parallelism each rank holds only a slice of a parameter, so an SVD or a projection of ``lora_A``
(r, d_in) cannot run on what the module exposes. :func:`gathered_parameters` makes the full values visible inside a
``with`` block and, with ``modify=True``, writes what the block changed back into every rank's shard. Which branch
runs is decided per parameter (:func:`parameter_sharding`):

- ``"none"``: a plain parameter (single process, DDP, ZeRO-1/2, which replicate parameters): no-op; the block sees
  and edits the real parameter, so edits persist whatever ``modify`` says.
- ``"zero3"`` (DeepSpeed ZeRO-3; recognised by the ``ds_id`` attribute, the parameter itself is an empty
  placeholder and the slice is ``param.ds_tensor``): ``deepspeed.zero.GatheredParameters(params,
  modifier_rank=0 if modify else None)``. deepspeed is imported only when such a parameter is seen.
- ``"fsdp1"`` (``FullyShardedDataParallel`` with ``use_orig_params=True``, which a frozen base + trainable LoRA
  requires; recognised by torch's ``_fsdp_flattened`` mark): ``FullyShardedDataParallel.summon_full_params(unit,
  recurse=False, writeback=modify)`` on each FSDP unit of ``model`` that directly owns one of ``params``. A unit
  unshards its whole flat parameter, so this gathers the frozen base weights of those units too (FSDP2 does not).
- ``"dtensor"`` (FSDP2 ``fully_shard``, or any DTensor parameter): the block sees a plain full-valued
  ``nn.Parameter`` (from ``full_tensor()``) registered in place of the DTensor; on exit the DTensor is registered
  again and, with ``modify=True`` and a normal exit, its local shard is overwritten with
  ``distribute_tensor(edited, mesh, placements)``.

Edits are made **by every rank, and rank 0's result wins**: the plugins run the same computation on every rank (as
under DDP), and on exit rank 0's full values are what every rank's shard receives — ZeRO-3 broadcasts from
``modifier_rank=0``, ``distribute_tensor`` scatters from rank 0 (``src_data_rank=0``), and for FSDP1 the full values
are broadcast from rank 0 before ``summon_full_params`` writes each rank's slice back. So ranks whose SVDs differ in
the last bit still end with one consistent model.

Rules for callers: enter the block on every rank at the same point with the same ``params`` in the same order (the
branches are collectives); look the parameters up again inside the block (under ``"dtensor"`` the module holds a
different object there, and names from :func:`canonical_name` are stable across wrappers); do not run a
forward/backward inside it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "ShardingError",
    "ShardingKind",
    "canonical_name",
    "full_value_for_loss",
    "gathered_parameters",
    "is_sharded",
    "parameter_sharding",
    "sharding_kind",
]

ShardingKind = Literal["none", "zero3", "fsdp1", "dtensor"]

_WRAPPER_PREFIXES: tuple[str, ...] = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
"""Name components FSDP1 and activation-checkpoint wrappers insert into parameter and module names."""


class ShardingError(RuntimeError):
    """Parameters are sharded in a way this code cannot gather (mixed schemes, a missing owner, no deepspeed)."""


def canonical_name(name: str) -> str:
    """``name`` without FSDP1 / activation-checkpoint wrapper components, so keys match the unwrapped model's.

    ``a._fsdp_wrapped_module.b._checkpoint_wrapped_module.c`` -> ``a.b.c``; other names are returned unchanged.
    """
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def parameter_sharding(param: Tensor) -> ShardingKind:
    """Which sharding scheme manages ``param`` (see the module docstring); ``"none"`` for a plain tensor."""
    if hasattr(param, "ds_id"):
        return "zero3"
    if getattr(param, "_fsdp_flattened", False):
        return "fsdp1"
    if _is_dtensor(param):
        return "dtensor"
    return "none"


def sharding_kind(params: Iterable[Tensor]) -> ShardingKind:
    """The one sharding scheme among ``params`` (``"none"`` if none is sharded); ShardingError if there are two."""
    kinds = {parameter_sharding(p) for p in params} - {"none"}
    if len(kinds) > 1:
        raise ShardingError(f"parameters are sharded by more than one scheme: {sorted(kinds)}")
    return next(iter(kinds)) if kinds else "none"


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is managed by ZeRO-3, FSDP1 or DTensor (FSDP2) sharding."""
    return sharding_kind(model.parameters()) != "none"


@contextlib.contextmanager
def gathered_parameters(model: nn.Module, params: Iterable[nn.Parameter], *, modify: bool) -> Iterator[None]:
    """Inside the block the full values of ``params`` are visible on every rank; with ``modify=True`` changes made
    inside are written back to the shards on exit (rank 0's values win). A no-op for unsharded parameters.

    ``model`` is the module tree holding ``params`` (FSDP1 and DTensor need their owning modules); it may be the
    wrapped model or ``accelerator.unwrap_model(...)`` of it.
    """
    params = list(params)
    kind = sharding_kind(params)
    if kind == "none":
        yield
    elif kind == "zero3":
        with _zero3_gathered(params, modify):
            yield
    elif kind == "fsdp1":
        with _fsdp1_gathered(model, params, modify):
            yield
    else:
        with _dtensor_gathered(model, params, modify):
            yield


def full_value_for_loss(param: Tensor) -> Tensor:
    """``param``'s full value, differentiable, for a loss term computed outside the forward (O-LoRA's penalty).

    A DTensor gives ``full_tensor()`` (its backward hands each rank the gradient of its shard); a plain tensor is
    returned as is. ZeRO-3 and FSDP1 free the full value after the forward and offer no differentiable gather, so
    they raise ShardingError rather than computing the term on a placeholder or a flat slice.
    """
    kind = parameter_sharding(param)
    if kind == "dtensor":
        return param.full_tensor()  # type: ignore[attr-defined]
    if kind != "none":
        raise ShardingError(
            f"a loss on whole weight matrices cannot be computed on {kind}-sharded parameters outside the forward; "
            "use FSDP2 (fsdp_version: 2), DDP or ZeRO-2"
        )
    return param


# ----- ZeRO-3 ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _zero3_gathered(params: list[nn.Parameter], modify: bool) -> Iterator[None]:
    try:
        deepspeed = importlib.import_module("deepspeed")
    except ImportError as err:
        raise ShardingError("parameters carry DeepSpeed ZeRO-3 ids (ds_id) but deepspeed is not installed") from err
    zero_params = [p for p in params if parameter_sharding(p) == "zero3"]
    with deepspeed.zero.GatheredParameters(zero_params, modifier_rank=0 if modify else None):
        yield


# ----- FSDP1 -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _fsdp1_gathered(model: nn.Module, params: list[nn.Parameter], modify: bool) -> Iterator[None]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = _fsdp1_owning_units(model, params, FSDP)
    uninitialised = [m for m in model.modules() if isinstance(m, FSDP) and getattr(m, "_is_root", None) is None]
    try:
        with contextlib.ExitStack() as stack:
            for unit in units:
                stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=modify))
            yield
            if modify:
                _broadcast_from_rank0(params)
    finally:
        # Unsharding lazily initialises the unit it is called on as an FSDP root. Called before the first forward on
        # an inner unit (the runner passes accelerate's unwrapped model, whose outer root FSDP is stripped), that
        # would make the real root's first forward fail its "non-root already marked root" check; so units that
        # were not initialised before are marked uninitialised again and the real root initialises them as usual.
        for unit in uninitialised:
            unit._is_root = None


def _fsdp1_owning_units(model: nn.Module, params: list[nn.Parameter], fsdp_type: type) -> list[nn.Module]:
    """The FSDP units of ``model`` (outermost first) that directly own one of the flattened ``params``."""
    owner: dict[int, nn.Module] = {}

    def walk(module: nn.Module, unit: nn.Module | None) -> None:
        unit = module if isinstance(module, fsdp_type) else unit
        for p in module._parameters.values():
            if p is not None and unit is not None:
                owner.setdefault(id(p), unit)
        for child in module.children():
            walk(child, unit)

    walk(model, None)
    units: list[nn.Module] = []
    for p in params:
        if parameter_sharding(p) != "fsdp1":
            continue
        unit = owner.get(id(p))
        if unit is None:
            raise ShardingError(
                "a parameter is flattened by an FSDP unit outside the given module (an outer root FSDP wrapper "
                "that was unwrapped); wrap the LoRA'd layers in their own FSDP units (transformer auto-wrap) or "
                "pass the FSDP-wrapped model"
            )
        if all(unit is not u for u in units):
            units.append(unit)
    return units


def _broadcast_from_rank0(params: list[nn.Parameter]) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


# ----- DTensor (FSDP2) -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _dtensor_gathered(model: nn.Module, params: list[nn.Parameter], modify: bool) -> Iterator[None]:
    from torch.distributed.tensor import distribute_tensor

    owners = _parameter_owners(model)
    swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
    try:
        with torch.no_grad():
            for p in params:
                if parameter_sharding(p) != "dtensor":
                    continue
                if id(p) not in owners:
                    raise ShardingError("a DTensor parameter is not registered in the given module")
                module, name = owners[id(p)]
                full = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)  # type: ignore[attr-defined]
                setattr(module, name, full)
                swapped.append((module, name, p, full))
        yield
        if modify:
            with torch.no_grad():
                for module, name, original, _ in swapped:
                    edited = module._parameters[name]
                    assert edited is not None
                    shard = distribute_tensor(
                        edited.detach(),
                        original.device_mesh,
                        original.placements,
                        src_data_rank=0,  # type: ignore[attr-defined]
                    )
                    original.to_local().copy_(shard.to_local())  # type: ignore[attr-defined]
    finally:
        # The DTensor objects go back in every case: FSDP2 and the optimizer hold references to them.
        for module, name, original, _ in swapped:
            setattr(module, name, original)


def _parameter_owners(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """``id(param)`` -> the (module, attribute name) it is registered under (first registration wins)."""
    owners: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), (module, name))
    return owners


def _is_dtensor(tensor: Any) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
