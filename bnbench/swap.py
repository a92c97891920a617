"""Whole models: swap the BatchNorm layers of a network for an implementation, and back.

``swap(model, "vectorized")`` replaces every nn.BatchNorm1d/2d/3d, carrying over parameters,
buffers, hyper-parameters (eps, momentum including None, affine, track_running_stats, also when
it was switched off after construction), device, dtype and train/eval mode. ``swap_back``
restores nn.BatchNorm layers with the swapped layers' current state.
"""

from __future__ import annotations

import torch
from torch import nn

from bnbench.registry import Config, Implementation, resolve

# Input rank each builtin class is swapped for (BatchNorm1d serves ranks 2 and 3 alike).
BUILTIN_RANKS = {nn.BatchNorm1d: 2, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
RANK_TO_CLASS = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_ROLES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class SwapError(Exception):
    """A layer the implementation cannot stand in for; names the layer and why."""


def _implementation(implementation) -> Implementation:
    if isinstance(implementation, Implementation):
        return implementation
    return resolve([implementation])[0]


def _copy_state(source: dict, target: dict, layer: str) -> None:
    with torch.no_grad():
        for role in _ROLES:
            src, dst = source.get(role), target.get(role)
            if src is None or dst is None:
                continue
            if dst.numel() != src.numel():
                raise SwapError(f"{layer}: {role} has {dst.numel()} values, expected {src.numel()}")
            dst.copy_(src.reshape(dst.shape).to(dst.dtype))


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def _layer_tensors(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    tensors = list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]
    if not tensors:
        return torch.device("cpu"), torch.get_default_dtype()
    return tensors[0].device, tensors[0].dtype


def swap(
    model: nn.Module, implementation, *, backward: bool = True, process_group=None
) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d/3d in ``model`` (in place; returns the model, or the new
    layer when ``model`` is itself a BatchNorm). ``backward=False``: the model will only run
    forward, so an implementation without a backward may stand in.

    A synchronized implementation (``swap(model, "sync")``) is built with ``process_group``
    (None: the whole world), as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does; layers that
    are already synchronized BatchNorms (nn.SyncBatchNorm) are replaced too."""
    impl = _implementation(implementation)
    if process_group is not None and not impl.distributed:
        raise SwapError(f"process_group given, but {impl.name} is not a synchronized BatchNorm")
    for name, module in list(model.named_modules()):
        rank = BUILTIN_RANKS.get(type(module))
        if rank is None and impl.distributed and type(module) is nn.SyncBatchNorm:
            rank = 4  # nn.SyncBatchNorm takes every rank; any rank's config describes it
        if rank is None:
            continue
        device, dtype = _layer_tensors(module)
        has_buffers = module.running_mean is not None
        has_bias = not module.affine or module.bias is not None
        c = module.num_features
        config = Config(
            rank=rank,
            device=device.type,
            dtype=dtype,
            module_dtype=dtype,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            bias=has_bias,
            track_running_stats=has_buffers,
            tracking_switched_off=has_buffers and not module.track_running_stats,
            needs_backward=backward,
            world_size=1 if impl.distributed else 0,
        )
        reasons = impl.not_supported_reasons(config)
        if reasons:
            layer = name or "the model"
            raise SwapError(
                f"{layer} ({module!r}) cannot be replaced by {impl.name}: " + "; ".join(reasons)
            )
        new = impl.make(
            config,
            c,
            explicit_kwargs=dict(
                eps=module.eps,
                momentum=module.momentum,
                affine=module.affine,
                track_running_stats=has_buffers,
            ),
            device=device,
            **({"process_group": process_group} if impl.distributed else {}),
        )
        _copy_state(
            {r: getattr(module, r, None) for r in _ROLES}, impl.state(new), name or "the model"
        )
        if has_buffers and not module.track_running_stats:
            setattr(new, "track_running_stats", False)  # noqa: B010 (nn.Module attribute)
        new.train(module.training)
        record = {
            "implementation": impl,
            "class": type(module),
            "num_features": c,
            "eps": module.eps,
            "momentum": module.momentum,
            "affine": module.affine,
            "has_buffers": has_buffers,
            "bias": has_bias,
            "track_running_stats": module.track_running_stats,
        }
        object.__setattr__(new, "_bnbench_swap", record)  # a plain attribute, not a submodule
        model = _replace(model, name, new)
    return model


def swap_back(model: nn.Module) -> nn.Module:
    """Turn every layer ``swap`` put in back into nn.BatchNorm, with its current state."""
    for name, module in list(model.named_modules()):
        config = getattr(module, "_bnbench_swap", None)
        if config is None:
            continue
        device, dtype = _layer_tensors(module)
        builtin = config["class"](
            config["num_features"],
            eps=config["eps"],
            momentum=config["momentum"],
            affine=config["affine"],
            track_running_stats=config["has_buffers"],
            device=device,
            dtype=dtype,
            **({} if config["bias"] else {"bias": False}),
        )
        _copy_state(
            config["implementation"].state(module),
            {r: getattr(builtin, r, None) for r in _ROLES},
            name or "the model",
        )
        builtin.track_running_stats = getattr(
            module, "track_running_stats", config["track_running_stats"]
        )
        builtin.train(module.training)
        model = _replace(model, name, builtin)
    return model
