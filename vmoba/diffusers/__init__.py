"""VMoBA inside diffusers Wan pipelines: processors, per-call settings, statistics.

Modules: `settings` (the settings a call accepts), `statistics` (what the calls did, and the
timer), `processor` (the self-attention processor), `install` (`install_vmoba`, the handle),
`training` (activation checkpointing that works with VMoBA installed; `docs/training.md`),
`compile` (`compile_blocks`: the transformer's repeated block compiled once around VMoBA's op),
`parallel` (`enable_ulysses`: one call split over several GPUs).

```python
from vmoba.diffusers import AttentionSettings, install_vmoba

handle = install_vmoba(pipe)                   # blocks.*.attn1 only; cross-attention untouched
with handle.use(AttentionSettings(threshold=0.25, dense_steps=0.25)) as stats:
    video = pipe(prompt, num_frames=81, height=480, width=832).frames
print(stats["density"], stats["attention_flops_ratio"])
handle.remove()                                # the stock processors again, bit for bit
```

How it fits into diffusers (0.35+, `WanTransformer3DModel`):
- Every self-attention module `blocks[l].attn1` gets a `VMoBAAttnProcessor` with layer index `l`
  (so the layer kind cycles 1d/2d/3d with the block's position). `attn2` (text) is untouched.
- Diffusers does not pass the video grid to processors, so a forward pre-hook on the transformer
  reads it from `hidden_states [B, C, F, H, W]` and the patch size: `grid = (F/pt, H/ph, W/pw)`.
  The same hook decides, once per transformer call, whether this call is sparse: the denoising
  step comes from the pipeline's scheduler (`step_index`, or `begin_index` before its first
  `step()`), never from counting calls (classifier-free guidance calls the transformer twice
  per step).
- Per-call settings live in `contextvars`, so each thread (or asyncio task) sees only its own
  `handle.use(...)` block; outside any block the settings given to `install_vmoba` apply.
- Dense calls (steps before the `dense_steps` cutoff, or `backend="dense"`) run the stock
  attention (`dispatch_attention_fn`, the same call the stock processor makes) on the same
  projections, so they match the stock processor bit for bit.

- Context parallelism: `parallel.enable_ulysses(transformers)` splits each call's tokens over the
  ranks of the default `torch.distributed` group with diffusers' own hooks and dense Ulysses
  attention; sparse calls exchange q/k/v with `vmoba.parallel` (every token of `H/N` heads per
  rank), so each rank selects and attends exactly as one process would for its heads. The
  statistics of a `use()` block are then summed over the ranks when it ends (every rank ends it).

Statistics (`docs/vmoba.md` section 8) are accumulated on the device and read once when a
`use()` block ends: achieved density per layer kind (`sum |K| / (H S^2)` over the sparse calls),
attention FLOPs of the call against all-dense attention, and, with `collect_timing=True`, the
time in the attention op itself (CUDA events, or wall time on the CPU). Without timing there is
no host sync during the call.
"""

from __future__ import annotations

from ..config import ATTENTION_BACKENDS, KERNELS, AttentionSettings
from .install import VMoBAHandle, install_vmoba
from .processor import VMoBAAttnProcessor
from .training import enable_gradient_checkpointing

__all__ = [
    "ATTENTION_BACKENDS",
    "KERNELS",
    "AttentionSettings",
    "VMoBAAttnProcessor",
    "VMoBAHandle",
    "enable_gradient_checkpointing",
    "install_vmoba",
]
