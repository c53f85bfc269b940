"""VMoBA inside diffusers Wan pipelines: processors, per-call settings, statistics.

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

Statistics (design note, section 8) are accumulated on the device and read once when a
`use()` block ends: achieved density per layer kind (`sum |K| / (H S^2)` over the sparse calls),
attention FLOPs of the call against all-dense attention, and, with `collect_timing=True`, the
time in the attention op itself (CUDA events, or wall time on the CPU). Without timing there is
no host sync during the call.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import torch

from .attention import vmoba_attention
from .config import LAYER_KINDS, VMoBAConfig
from .flops import full_attention_flops, vmoba_attention_flops
from .partition import num_blocks

ATTENTION_BACKENDS = ("vmoba", "dense")
KERNELS = ("auto", "triton", "reference")  # `backend=` of vmoba_attention

# `int(dense_steps * num_steps)` with a little slack, so that e.g. 0.29 * 100 (28.999...96 in
# floating point) counts 29 dense steps, as a person reading the setting expects.
_CUTOFF_EPS = 1e-9


# -- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionSettings:
    """Per-call VMoBA settings (a request's `attention` object), validated on construction.

    - `backend`: `"vmoba"` (sparse after the dense steps) or `"dense"` (stock attention for the
      whole call).
    - `select`, `threshold`, `topk`: the selection (design note, section 4); `topk` is one int
      or one per layer kind `(1d, 2d, 3d)`.
    - `dense_steps`: fraction in `[0, 1]` of denoising steps run dense: steps
      `0 .. int(dense_steps * num_steps) - 1` (the paper keeps the first 25%).
    - `temporal_chunk`, `spatial_chunk`, `st_chunk`: `None` (default) picks chunks for the
      grid with `VMoBAConfig.for_grid` (the paper's table for the standard Wan grids); a value
      forces that chunk.
    - `kernel`: `"auto" | "triton" | "reference"`, passed as `backend=` to `vmoba_attention`.
    - `collect_timing`: time the attention op of every self-attention call (host syncs once at
      the end of the call; CUDA events, so the kernels still run back to back).
    - `collect_density`: report the achieved density (the attention op counts the attended
      tokens on the device as it selects; one host read at the end of the call).

    Bad values raise `ValueError` naming the field.
    """

    backend: str = "vmoba"
    select: str = "threshold_global"
    threshold: float = 0.25
    topk: Tuple[int, int, int] = (2, 6, 18)
    dense_steps: float = 0.25
    temporal_chunk: Optional[int] = None
    spatial_chunk: Optional[Tuple[int, int]] = None
    st_chunk: Optional[Tuple[int, int, int]] = None
    kernel: str = "auto"
    collect_timing: bool = False
    collect_density: bool = True

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if self.backend not in ATTENTION_BACKENDS:
            raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {self.backend!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        d = self.dense_steps
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0.0 <= d <= 1.0):
            raise ValueError(f"dense_steps must be a number in [0, 1], got {d!r}")
        set_("dense_steps", float(d))
        for name in ("collect_timing", "collect_density"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        # VMoBAConfig validates and normalises the selection fields and explicit chunks (lists
        # from JSON become tuples, one topk int becomes three); its errors name the field.
        probe = VMoBAConfig(select=self.select, threshold=self.threshold, topk=self.topk, **self.chunks)
        set_("threshold", probe.threshold)
        set_("topk", probe.topk)
        for name in self.chunks:
            set_(name, getattr(probe, name))

    @property
    def chunks(self) -> dict:
        """The chunk sizes given explicitly (the others are chosen for the grid)."""
        names = ("temporal_chunk", "spatial_chunk", "st_chunk")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def vmoba_config(self, grid) -> VMoBAConfig:
        """The `VMoBAConfig` these settings give on `grid = (T, Hg, Wg)` (cached)."""
        return _config_for(self, tuple(grid))

    def dense_cutoff(self, num_steps: int) -> int:
        """Steps `0 .. cutoff - 1` of a `num_steps`-step call run dense."""
        return int(self.dense_steps * num_steps + _CUTOFF_EPS)

    def replace(self, **changes) -> "AttentionSettings":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data) -> "AttentionSettings":
        """Settings from a JSON object; missing or `null` fields take their defaults."""
        if data is None:
            return cls()
        if isinstance(data, AttentionSettings):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"attention settings must be an object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown attention setting(s) {unknown}; allowed: {names}")
        return cls(**{k: v for k, v in data.items() if v is not None})

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples as lists) that `from_dict` reads back."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@functools.lru_cache(maxsize=256)
def _config_for(settings: AttentionSettings, grid) -> VMoBAConfig:
    return VMoBAConfig.for_grid(
        grid, select=settings.select, threshold=settings.threshold, topk=settings.topk, **settings.chunks
    )


def _coerce(settings, overrides) -> AttentionSettings:
    if settings is None:
        settings = AttentionSettings()
    elif not isinstance(settings, AttentionSettings):
        settings = AttentionSettings.from_dict(settings)
    return settings.replace(**overrides) if overrides else settings


# -- statistics ---------------------------------------------------------------------------------


class _Stats:
    """What the self-attention calls of one `use()` block did (device scalars until `summary`)."""

    def __init__(self):
        self._lock = threading.Lock()  # only the handle's default state is shared by threads
        self.kinds = {}  # kind -> [calls, attended (device scalar or None), pairs, full, gate]
        self.dense_calls = 0
        self.dense_flops = 0.0
        self.steps = {}  # step index -> True if that step's calls were sparse
        self.timings = []  # (label, start, end): CUDA events, or perf_counter floats

    def step(self, step, sparse: bool):
        if step is not None:
            with self._lock:
                self.steps[step] = sparse

    def add_dense(self, batch: int, tokens: int, d_model: int):
        with self._lock:
            self.dense_calls += 1
            self.dense_flops += batch * full_attention_flops(tokens, d_model)

    def add_sparse(self, kind, batch, heads, tokens, d_model, blocks, attended):
        """`attended`: device scalar `sum_{b,h,i} |K|` of the call, or `None` when not counted."""
        full = batch * full_attention_flops(tokens, d_model)
        gate = batch * vmoba_attention_flops(tokens, d_model, blocks, 0.0)
        with self._lock:
            entry = self.kinds.setdefault(kind, [0, 0, 0, 0.0, 0.0])
            entry[0] += 1
            if attended is None or entry[1] is None:
                entry[1] = None
            else:
                entry[1] = attended if isinstance(entry[1], int) else entry[1] + attended
            entry[2] += batch * heads * tokens * tokens
            entry[3] += full
            entry[4] += gate

    def add_timing(self, label, start, end):
        with self._lock:
            self.timings.append((label, start, end))

    def summary(self, settings: AttentionSettings) -> dict:
        """Read the device counters (one sync) and return a JSON-ready dict."""
        with self._lock:
            kinds = {k: list(v) for k, v in self.kinds.items()}
            timings = list(self.timings)
            dense_calls, dense_flops, steps = self.dense_calls, self.dense_flops, dict(self.steps)
        by_kind, attended_all, pairs_all, sparse_flops, full_sparse = {}, 0.0, 0, 0.0, 0.0
        counted = True
        for kind in LAYER_KINDS:
            if kind not in kinds:
                continue
            calls, attended, pairs, full, gate = kinds[kind]
            full_sparse += full
            if attended is None:
                counted = False
                continue
            attended = float(attended)  # the one device read of the call
            rho = attended / pairs
            by_kind[kind] = rho
            attended_all += attended
            pairs_all += pairs
            # summing rho_call * full_call over the calls of a kind gives rho_kind * full_kind
            sparse_flops += gate + rho * full
        sparse_calls = sum(v[0] for v in kinds.values())
        density = (attended_all / pairs_all) if (counted and pairs_all) else None
        total_dense = dense_flops + full_sparse
        actual = dense_flops + sparse_flops if counted else None
        out = {
            "attention": settings.backend,
            "select": settings.select,
            "steps": len(steps),
            "dense_steps": sum(1 for s in steps.values() if not s),
            "layer_calls": {"dense": dense_calls, "sparse": sparse_calls},
            "density": density,
            "density_by_kind": by_kind if counted else None,
            "attention_flops_dense": total_dense,
            "attention_flops": actual,
            "attention_flops_saved": (total_dense - actual) if actual is not None else None,
            "attention_flops_ratio": (total_dense / actual) if actual else None,
        }
        if settings.collect_timing:
            out.update(_timing_summary(timings))
        return out


def _timing_summary(timings) -> dict:
    if any(isinstance(start, torch.cuda.Event) for _, start, _ in timings):
        torch.cuda.synchronize()
    by_label = {}
    for label, start, end in timings:
        ms = start.elapsed_time(end) if isinstance(start, torch.cuda.Event) else (end - start) * 1e3
        by_label[label] = by_label.get(label, 0.0) + ms
    return {"attention_ms": sum(by_label.values()), "attention_ms_by_kind": by_label}


class _CallState:
    """The settings and statistics of one `use()` block (or of calls outside any block)."""

    def __init__(self, settings: AttentionSettings):
        self.settings = settings
        self.stats = _Stats()


@dataclass
class _Forward:
    """What the pre-hook decided for one transformer call."""

    state: _CallState
    grid: Tuple[int, int, int]
    step: Optional[int]
    config: Optional[VMoBAConfig]  # None: this call is dense
    token: object = None


# -- the processor ------------------------------------------------------------------------------


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on `x [B, S, H, D]`, the same ops as the stock processor's."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class VMoBAAttnProcessor:
    """Self-attention processor for a `WanAttention` (`attn1`) that runs VMoBA or dense attention.

    It computes the projections, q/k norms and rotary embedding as the stock `WanAttnProcessor`
    does, then `vmoba_attention` on `q, k, v [B, S, H, D]` for sparse calls, or the stock
    `dispatch_attention_fn` for dense ones. The call's grid, step and settings come from the
    handle's pre-hook on the transformer.
    """

    # diffusers' set_attention_backend / enable_parallelism write these
    _attention_backend = None
    _parallel_config = None

    def __init__(self, handle: "VMoBAHandle", layer_idx: int, stock):
        self.handle = handle
        self.layer_idx = layer_idx
        self.stock = stock
        self._attention_backend = getattr(stock, "_attention_backend", None)
        self._parallel_config = getattr(stock, "_parallel_config", None)

    def __repr__(self):
        return f"VMoBAAttnProcessor(layer_idx={self.layer_idx})"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("VMoBAAttnProcessor is for self-attention without a mask (blocks.*.attn1)")
        fwd = self.handle._current_forward()
        query, key, value = _qkv_projections(attn, hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary(query, *rotary_emb)
            key = _apply_rotary(key, *rotary_emb)

        settings, stats = fwd.state.settings, fwd.state.stats
        timer = _Timer(query.device) if settings.collect_timing else None
        if fwd.config is None:
            label = "dense"
            if timer:
                timer.start()
            out = self._dense(query, key, value)
        else:
            label = fwd.config.kind(self.layer_idx)
            if timer:
                timer.start()
            if self._parallel_config is not None:
                raise ValueError("VMoBA does not support context parallelism (the grid would be split)")
            call_stats = {} if settings.collect_density else None
            out = vmoba_attention(
                query, key, value, grid=fwd.grid, layer_idx=self.layer_idx, config=fwd.config,
                backend=settings.kernel, stats=call_stats,
            )
        if timer:
            stats.add_timing(label, *timer.stop())
        self._count(fwd, query, label, call_stats if fwd.config is not None else None)

        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _dense(self, query, key, value):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        # parallel_config only when set: diffusers before 0.36 has no such argument
        extra = {} if self._parallel_config is None else {"parallel_config": self._parallel_config}
        return dispatch_attention_fn(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, **extra,
        )

    def _count(self, fwd: _Forward, query, label, call_stats):
        """Add this call to the job's statistics; `call_stats` is what `vmoba_attention` reported."""
        b, s, h, d = query.shape
        stats = fwd.state.stats
        if fwd.config is None:
            stats.add_dense(b, s, h * d)
            return
        blocks = num_blocks(fwd.grid, label, fwd.config)
        attended = call_stats["attended"] if call_stats else None
        stats.add_sparse(label, b, h, s, h * d, blocks, attended)


def _qkv_projections(attn, hidden_states):
    """q, k, v `[B, S, H*D]` of a self-attention module, fused or not (as diffusers does)."""
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


class _Timer:
    """Start/stop marks: CUDA events on the current stream, or wall time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return self._start, end
        return self._start, time.perf_counter()


# -- install / handle ---------------------------------------------------------------------------


def _scheduler_step(scheduler):
    """`(step, num_steps)` of the denoising loop now running, from the pipeline's scheduler.

    diffusers schedulers count `step_index` up in `step()`; before the first `step()` of a call
    it is `None` and the loop starts at `begin_index` (pipelines set 0).
    """
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        raise ValueError("the scheduler has no timesteps: call the pipeline (it sets them)")
    step = getattr(scheduler, "step_index", None)
    if step is None:
        step = getattr(scheduler, "begin_index", None) or 0
    return int(step), len(timesteps)


class VMoBAHandle:
    """VMoBA installed on one or more Wan transformers (e.g. Wan 2.2's two experts).

    `use(settings)` sets the settings of the calls inside it (this thread/task only) and yields
    a dict that is filled with the statistics when the block ends. `stats()` returns the
    statistics of the last `use()` block that ended in this context (or, if none has, of the
    calls made outside any block). `remove()` puts the stock processors back.
    """

    def __init__(self, transformers, settings: AttentionSettings, scheduler=None):
        self.transformers = list(transformers)
        self.settings = settings
        self.scheduler = scheduler
        self._call = contextvars.ContextVar(f"vmoba_call_{id(self)}", default=None)
        self._forward = contextvars.ContextVar(f"vmoba_forward_{id(self)}", default=None)
        self._last = contextvars.ContextVar(f"vmoba_last_{id(self)}", default=None)
        self._default = _CallState(settings)
        self._stock = []  # (attn module, stock processor)
        self._hooks = []
        self.installed = False

    # -- install / remove ------------------------------------------------------------------

    def _install(self):
        for transformer in self.transformers:
            if getattr(transformer, "_vmoba_handle", None) is not None:
                raise ValueError("VMoBA is already installed on this transformer; remove() it first")
        for transformer in self.transformers:
            for layer_idx, block in enumerate(transformer.blocks):
                attn = block.attn1
                stock = attn.processor
                self._stock.append((attn, stock))
                attn.set_processor(VMoBAAttnProcessor(self, layer_idx, stock))
            patch = tuple(transformer.config.patch_size)
            self._hooks.append(
                transformer.register_forward_pre_hook(functools.partial(self._pre, patch), with_kwargs=True)
            )
            self._hooks.append(transformer.register_forward_hook(self._post, always_call=True))
            transformer._vmoba_handle = self
        self.installed = True

    def remove(self) -> None:
        """Restore the stock processors (the same objects) and drop the hooks. Idempotent."""
        for attn, stock in self._stock:
            attn.set_processor(stock)
        for hook in self._hooks:
            hook.remove()
        for transformer in self.transformers:
            if getattr(transformer, "_vmoba_handle", None) is self:
                transformer._vmoba_handle = None
        self._stock, self._hooks, self.installed = [], [], False

    # -- per call ----------------------------------------------------------------------------

    @contextmanager
    def use(self, settings=None, **overrides):
        """Run the calls inside with `settings` (an `AttentionSettings`, a dict, or `None` for
        the defaults), fields in `overrides` replaced. Yields a dict filled with `stats` on exit.
        """
        state = _CallState(_coerce(settings, overrides))
        token = self._call.set(state)
        stats = {}
        try:
            yield stats
        finally:
            self._call.reset(token)
        # only on success: after an error the device may not be readable
        stats.update(state.stats.summary(state.settings))
        self._last.set(stats)

    def stats(self) -> dict:
        """Statistics of the last finished `use()` block in this context (see the class doc)."""
        last = self._last.get()
        if last is not None:
            return dict(last)
        return self._default.stats.summary(self._default.settings)

    def reset_stats(self) -> None:
        """Forget the statistics of calls made outside `use()` blocks."""
        self._default = _CallState(self.settings)

    # -- hooks -------------------------------------------------------------------------------

    def _pre(self, patch, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _, _, frames, height, width = hidden.shape
        grid = (frames // patch[0], height // patch[1], width // patch[2])
        state = self._call.get() or self._default
        settings = state.settings
        step = None
        sparse = settings.backend == "vmoba"
        if sparse and settings.dense_steps > 0:
            if self.scheduler is None:
                raise ValueError(
                    f"dense_steps={settings.dense_steps} needs the denoising step: install VMoBA "
                    "on the pipeline (or pass scheduler=), or use dense_steps=0"
                )
            step, num_steps = _scheduler_step(self.scheduler)
            sparse = step >= settings.dense_cutoff(num_steps)
        elif self.scheduler is not None and getattr(self.scheduler, "timesteps", None) is not None:
            step = _scheduler_step(self.scheduler)[0]
        state.stats.step(step, sparse)
        fwd = _Forward(state, grid, step, settings.vmoba_config(grid) if sparse else None)
        fwd.token = self._forward.set(fwd)

    def _post(self, module, args, output):
        fwd = self._forward.get()
        if fwd is not None:
            self._forward.reset(fwd.token)

    def _current_forward(self) -> _Forward:
        fwd = self._forward.get()
        if fwd is None:
            raise RuntimeError(
                "VMoBA processor called outside the transformer's forward: the video grid is unknown"
            )
        return fwd


def install_vmoba(pipe_or_transformer, settings=None, *, scheduler=None) -> VMoBAHandle:
    """Put VMoBA on the self-attention (`blocks.*.attn1`) of a Wan pipeline's transformer(s).

    `pipe_or_transformer`: a `WanPipeline` (its `transformer`, and `transformer_2` when
    present; the step index comes from its scheduler) or a `WanTransformer3DModel` (pass its
    pipeline's `scheduler` for `dense_steps`, or use `dense_steps=0`). `settings` (an
    `AttentionSettings` or dict) apply to calls outside `handle.use(...)` blocks.
    """
    settings = _coerce(settings, {})
    target = pipe_or_transformer
    if hasattr(target, "blocks"):
        transformers = [target]
    elif getattr(target, "transformer", None) is not None or getattr(target, "transformer_2", None) is not None:
        transformers = [t for t in (target.transformer, getattr(target, "transformer_2", None)) if t is not None]
        scheduler = scheduler if scheduler is not None else getattr(target, "scheduler", None)
    else:
        raise ValueError(f"expected a Wan pipeline or transformer, got {type(target).__name__}")
    for t in transformers:
        blocks = getattr(t, "blocks", None)
        if not blocks or not all(hasattr(b, "attn1") and hasattr(b.attn1, "set_processor") for b in blocks):
            raise ValueError(f"{type(t).__name__} has no blocks[*].attn1 attention modules (not a Wan DiT?)")
        if not hasattr(getattr(t, "config", None), "patch_size"):
            raise ValueError(f"{type(t).__name__} has no config.patch_size")
    handle = VMoBAHandle(transformers, settings, scheduler)
    handle._install()
    return handle
