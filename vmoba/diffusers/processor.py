"""The self-attention processor: Wan's projections, then VMoBA or the stock dense attention."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import parallel
from ..attention import vmoba_attention
from ..drift import DEFAULT_ROWS, drift_sums, sample_rows
from ..ops import call_attention, register_processor
from ..partition import block_layout, num_blocks
from ..select import select_blocks
from ..validate import resolve_scale
from .statistics import Timer

if TYPE_CHECKING:
    from .install import Forward, VMoBAHandle


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
    does, then the custom op `vmoba::self_attention` (`vmoba.ops`), which runs `attend`: VMoBA
    (`vmoba::attention`) on `q, k, v [B, S, H, D]` for sparse calls, or the stock
    `dispatch_attention_fn` for dense ones. The call's grid, step and settings come from the
    handle's pre-hook on the transformer and are read inside the op, so a compiled block
    (`vmoba.diffusers.compile`) serves every request without recompiling.
    """

    # diffusers' set_attention_backend / enable_parallelism write these
    _attention_backend = None
    _parallel_config = None

    def __init__(self, handle: VMoBAHandle, layer_idx: int, stock):
        self.handle = handle
        self.layer_idx = layer_idx
        self.stock = stock
        # how vmoba::self_attention finds this object: a CPU tensor, not an int, so that the
        # blocks of a model (one compiled code) differ in a graph input, not in a guard
        self.key = torch.tensor(register_processor(self))
        self._attention_backend = getattr(stock, "_attention_backend", None)
        self._parallel_config = getattr(stock, "_parallel_config", None)

    def __repr__(self):
        return f"VMoBAAttnProcessor(layer_idx={self.layer_idx})"

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        # Traced by torch.compile: tensors only. What the call wants (dense or
        # VMoBA, its settings, the statistics) is read at run time inside the op (`attend`).
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                "VMoBAAttnProcessor is for self-attention without a mask (blocks.*.attn1)"
            )
        query, key, value = _qkv_projections(attn, hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary(query, *rotary_emb)
            key = _apply_rotary(key, *rotary_emb)
        if torch.is_grad_enabled() and query.requires_grad:
            out = self.attend(query, key, value)  # differentiable (see `_sparse`)
        else:
            out = torch.ops.vmoba.self_attention(query, key, value, self.key)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def attend(self, query, key, value):
        """The attention of one call on `q, k, v [B, S, H, D]` (`vmoba::self_attention` runs
        this): dense or VMoBA as the transformer call's pre-hook decided, with its statistics.
        Under Ulysses context parallelism `q, k, v` hold this rank's tokens of every head; a
        sparse call exchanges them for every token of this rank's heads and back (inside the op,
        so a compiled block never traces a collective)."""
        fwd = self.handle._current_forward()
        settings, stats = fwd.state.settings, fwd.state.stats
        timer = Timer(query.device) if settings.collect_timing else None
        group, world = self._ulysses_group()
        if timer:
            timer.start()
        if fwd.config is None:
            label = "dense"
            out = self._dense(query, key, value)  # diffusers' Ulysses when the sequence is split
            if timer:
                stats.add_timing(label, *timer.stop())
            # every rank counts the whole call (its tokens times N): all report the same totals
            self._count(fwd, query.shape[0], query.shape[1] * world, query.shape[2], query, None)
            return out
        label = fwd.config.kind(self.layer_idx)
        if group is not None:
            # this rank's tokens of every head -> every token of this rank's heads
            query, key, value = parallel.heads_from_sequence([query, key, value], group)
            stats.group = group  # the device counters are this rank's heads: summed at the end
        heads_out, attended = self._sparse(fwd, label, query, key, value, settings.kernel)
        out = heads_out if group is None else parallel.sequence_from_heads(heads_out, group)
        if timer:
            stats.add_timing(label, *timer.stop())
        b, s, h, _ = query.shape
        self._count(fwd, b, s, h * world, query, attended if settings.collect_density else None)
        if settings.collect_drift:  # after the timer: not timed
            self._drift(fwd, query, key, value, heads_out, label, world)
        return out

    def _sparse(self, fwd, kind: str, query, key, value, kernel: str):
        """VMoBA on this layer -> `(out, attended)`: the inference op, or, when a gradient is
        wanted (training), the public op, differentiable on either kernel (the Triton one
        through `vmoba::sparse_attention_fwd`, which compiles)."""
        if torch.is_grad_enabled() and query.requires_grad:
            stats: dict = {}
            out = vmoba_attention(
                query,
                key,
                value,
                grid=fwd.grid,
                layer_idx=self.layer_idx,
                config=fwd.config,
                kernel=kernel,
                stats=stats,
            )
            return out, stats["attended"]
        return call_attention(
            query,
            key,
            value,
            grid=fwd.grid,
            kind=kind,
            config=fwd.config,
            softmax_scale=resolve_scale(None, query.shape[-1]),
            kernel=kernel,
        )

    def _ulysses_group(self):
        """`(process group, N)` of diffusers' context parallelism (Ulysses only), else
        `(None, 1)`."""
        config = self._parallel_config
        cp = getattr(config, "context_parallel_config", None)
        if cp is None:
            return None, 1
        if cp.ring_degree > 1:
            raise ValueError(
                "VMoBA needs every token of a head on one rank: use Ulysses context parallelism "
                f"(ring_degree 1), got ring_degree={cp.ring_degree}"
            )
        return cp._ulysses_mesh.get_group(), cp.ulysses_degree

    def _dense(self, query, key, value):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        # parallel_config only when set: diffusers before 0.36 has no such argument
        extra = {} if self._parallel_config is None else {"parallel_config": self._parallel_config}
        return dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            **extra,
        )

    def _drift(self, fwd: Forward, query, key, value, out, kind: str, world: int = 1):
        """Add this sparse call's drift sums (`vmoba.drift`) to the job's statistics, no sync.

        The selection is computed again with the same kernel, which gives the mask the attention
        used (the selection is deterministic); `out` is the attention's own output. Under
        context parallelism `query..out` hold this rank's `H/world` heads of every token: the
        sums are this rank's share (the statistics add the ranks' up), the rows the call's."""
        config = fwd.config
        assert config is not None  # sparse calls only
        with torch.no_grad():
            selected = select_blocks(
                query,
                key,
                grid=fwd.grid,
                layer_idx=self.layer_idx,
                config=config,
                kernel=fwd.state.settings.kernel,
            )
            rows = sample_rows(query.shape[1], DEFAULT_ROWS, query.device)
            ids = block_layout(fwd.grid, kind, config, device=query.device).ids
            sums = drift_sums(
                query, key, value, rows, [(selected[:, :, rows], ids)], outs=[out[:, rows]]
            )
        b, _, h, _ = query.shape
        fwd.state.stats.add_drift(
            kind, fwd.step, sums[0], b * h * world * rows.numel(), rows.numel()
        )

    def _count(self, fwd: Forward, batch: int, tokens: int, heads: int, query, attended):
        """Add this call (`batch` samples, `tokens` tokens, `heads` heads of the whole call) to
        the job's statistics; `attended`: the op's count of attended key tokens (a device
        scalar), or `None` when not collected."""
        d_model = heads * query.shape[-1]
        stats = fwd.state.stats
        if fwd.config is None:
            stats.add_dense(batch, tokens, d_model)
            return
        label = fwd.config.kind(self.layer_idx)
        blocks = num_blocks(fwd.grid, label, fwd.config)
        stats.add_sparse(label, batch, heads, tokens, d_model, blocks, attended)


def _qkv_projections(attn, hidden_states):
    """q, k, v `[B, S, H*D]` of a self-attention module, fused or not (as diffusers does)."""
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
