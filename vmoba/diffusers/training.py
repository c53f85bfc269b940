"""Fine-tuning a Wan transformer with VMoBA installed: activation checkpointing that keeps the
call's VMoBA state.

The processors find the video grid and the call's settings in context variables that the
transformer's forward hooks set and reset (`install`). Non-reentrant activation checkpointing runs
a block's forward again during the backward, after the transformer's forward has returned, where
those variables are unset; `enable_gradient_checkpointing` runs each recomputation in a copy of
the context the block's first forward ran in.
"""

from __future__ import annotations

import contextvars
import functools

import torch


def checkpoint_in_call_context(module, *args):
    """diffusers' default checkpoint function (non-reentrant), recomputing in the forward's
    context."""
    context = contextvars.copy_context()
    return torch.utils.checkpoint.checkpoint(
        functools.partial(context.run, module.__call__), *args, use_reentrant=False
    )


def enable_gradient_checkpointing(transformer) -> None:
    """`transformer.enable_gradient_checkpointing()` that works with VMoBA installed (also
    without it: then it is diffusers' default)."""
    transformer.enable_gradient_checkpointing(
        gradient_checkpointing_func=checkpoint_in_call_context
    )
