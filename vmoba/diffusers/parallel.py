"""Ulysses context parallelism on Wan transformers, with diffusers' own machinery.

`enable_ulysses(transformers)` splits every call of the transformers over the ranks of the
default process group (`torch.distributed`, NCCL on GPUs, gloo on CPUs):

- diffusers' context-parallel hooks, from `WanTransformer3DModel._cp_plan`, cut the patch
  tokens (and the rotary tables) into `N` equal runs of consecutive tokens before the first
  block and gather the output of `proj_out`: the blocks see `S/N` tokens per rank;
- the stock attention processors (cross-attention, and self-attention in dense calls) get
  diffusers' `ParallelConfig`, so `dispatch_attention_fn` runs its Ulysses all-to-all;
- `VMoBAAttnProcessor` (`install_vmoba`, before or after this) gets it too and, in sparse calls,
  exchanges q/k/v with `vmoba.parallel` so that each rank runs VMoBA on `H/N` heads of the
  whole grid.

diffusers' `ModelMixin.enable_parallelism` would do the same, but it takes the device from
`torch.accelerator`, which fails on a CPU-only machine (the gloo tests), and it is marked
experimental; the parts used here are its config, mesh and hooks. Every rank must run the same
calls with the same inputs (the pipeline's seeded generator gives them the same noise).
"""

from __future__ import annotations

import torch

from ..parallel import check_heads


def enable_ulysses(transformers, *, device: torch.device | str | None = None):
    """Split the calls of each Wan transformer in `transformers` over every rank of the default
    process group (Ulysses: `ulysses_degree = world size`). Returns diffusers' `ParallelConfig`.

    `device` (default: the first transformer's) names the mesh's device type. `ValueError` when
    the world size does not divide a transformer's head count."""
    import torch.distributed as dist
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    transformers = list(transformers)
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    world, rank = dist.get_world_size(), dist.get_rank()
    for t in transformers:
        check_heads(int(t.config.num_attention_heads), world)
        if getattr(t, "_cp_plan", None) is None:
            raise ValueError(f"{type(t).__name__} has no context-parallel plan (_cp_plan)")
        if getattr(t, "_parallel_config", None) is not None:
            raise ValueError(f"{type(t).__name__} already runs in parallel")
    if device is None:
        device = next(transformers[0].parameters()).device
    device = torch.device(device)
    cp = ContextParallelConfig(ulysses_degree=world)
    config = ParallelConfig(context_parallel_config=cp)
    mesh = init_device_mesh(device.type, cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config.setup(rank, world, device, mesh=mesh)
    for t in transformers:
        t._parallel_config = config
        for processor in _processors(t):
            processor._parallel_config = config
        apply_context_parallel(t, cp, t._cp_plan)
    return config


def _processors(transformer):
    """Every attention processor of `transformer` that takes a parallel config: the installed
    ones and, when VMoBA is installed, the stock ones it would put back."""
    found = []
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            found.append(processor)
    handle = getattr(transformer, "_vmoba_handle", None)
    for _, stock in getattr(handle, "_stock", ()):
        if hasattr(stock, "_parallel_config"):
            found.append(stock)
    return found
