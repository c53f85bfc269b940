"""Installing VMoBA on Wan transformers: `install_vmoba`, and the handle that sets per-call
settings (`use`), reports statistics and puts the stock processors back (`remove`)."""

from __future__ import annotations

import contextvars
import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, cast

from ..config import AttentionSettings, VMoBAConfig
from .processor import VMoBAAttnProcessor
from .settings import coerce_settings
from .statistics import Stats

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle


class CallState:
    """The settings and statistics of one `use()` block (or of calls outside any block)."""

    def __init__(self, settings: AttentionSettings):
        self.settings = settings
        self.stats = Stats()


@dataclass
class Forward:
    """What the pre-hook decided for one transformer call."""

    state: CallState
    grid: tuple[int, int, int]
    step: Optional[int]
    config: Optional[VMoBAConfig]  # None: this call is dense
    token: Optional[contextvars.Token[Optional[Forward]]] = (
        None  # set by _pre right after construction
    )


def scheduler_step(scheduler):
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
        self._call: contextvars.ContextVar[Optional[CallState]] = contextvars.ContextVar(
            f"vmoba_call_{id(self)}", default=None
        )
        self._forward: contextvars.ContextVar[Optional[Forward]] = contextvars.ContextVar(
            f"vmoba_forward_{id(self)}", default=None
        )
        self._last: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar(
            f"vmoba_last_{id(self)}", default=None
        )
        self._default = CallState(settings)
        self._stock: list[tuple[Any, Any]] = []  # (attn module, stock processor)
        self._hooks: list[RemovableHandle] = []
        self.installed = False

    # -- install / remove ------------------------------------------------------------------

    def _install(self):
        for transformer in self.transformers:
            if getattr(transformer, "_vmoba_handle", None) is not None:
                raise ValueError(
                    "VMoBA is already installed on this transformer; remove() it first"
                )
        for transformer in self.transformers:
            for layer_idx, block in enumerate(transformer.blocks):
                attn = block.attn1
                stock = attn.processor
                self._stock.append((attn, stock))
                attn.set_processor(VMoBAAttnProcessor(self, layer_idx, stock))
            patch = tuple(transformer.config.patch_size)
            self._hooks.append(
                transformer.register_forward_pre_hook(
                    functools.partial(self._pre, patch), with_kwargs=True
                )
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
        state = CallState(coerce_settings(settings, overrides))
        token = self._call.set(state)
        stats: dict = {}
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
        self._default = CallState(self.settings)

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
            step, num_steps = scheduler_step(self.scheduler)
            sparse = step >= settings.dense_cutoff(num_steps)
        elif self.scheduler is not None and getattr(self.scheduler, "timesteps", None) is not None:
            step = scheduler_step(self.scheduler)[0]
        state.stats.step(step, sparse)
        fwd = Forward(state, grid, step, settings.vmoba_config(grid) if sparse else None)
        fwd.token = self._forward.set(fwd)

    def _post(self, module, args, output):
        fwd = self._forward.get()
        if fwd is not None:
            # a no-op cast: _pre sets the token of every Forward it makes current
            self._forward.reset(cast("contextvars.Token[Optional[Forward]]", fwd.token))

    def _current_forward(self) -> Forward:
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
    settings = coerce_settings(settings, {})
    target = pipe_or_transformer
    if hasattr(target, "blocks"):
        transformers = [target]
    elif (
        getattr(target, "transformer", None) is not None
        or getattr(target, "transformer_2", None) is not None
    ):
        transformers = [
            t for t in (target.transformer, getattr(target, "transformer_2", None)) if t is not None
        ]
        scheduler = scheduler if scheduler is not None else getattr(target, "scheduler", None)
    else:
        raise ValueError(f"expected a Wan pipeline or transformer, got {type(target).__name__}")
    for t in transformers:
        blocks = getattr(t, "blocks", None)
        if not blocks or not all(
            hasattr(b, "attn1") and hasattr(b.attn1, "set_processor") for b in blocks
        ):
            raise ValueError(
                f"{type(t).__name__} has no blocks[*].attn1 attention modules (not a Wan DiT?)"
            )
        if not hasattr(getattr(t, "config", None), "patch_size"):
            raise ValueError(f"{type(t).__name__} has no config.patch_size")
    handle = VMoBAHandle(transformers, settings, scheduler)
    handle._install()
    return handle
