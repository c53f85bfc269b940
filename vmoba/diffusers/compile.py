"""Regional compilation of a Wan transformer with VMoBA installed (or not).

`compile_blocks(transformer)` compiles the repeated block (`WanTransformerBlock`) once with
`torch.compile(fullgraph=True)`; the 30 (or 40) blocks share the compiled code, so compiling
takes seconds rather than the minutes a whole-model compile takes, for the same step time.
With VMoBA installed the self-attention is the opaque op `vmoba::self_attention`
(`vmoba.ops`): the per-request settings are read inside it at run time, so neither they nor
the dense/VMoBA switch of `dense_steps` recompile anything. A new video size does, once
(dynamo then treats the sizes as dynamic).
"""

from __future__ import annotations


def compile_blocks(transformer, **options) -> None:
    """Compile every repeated block of `transformer` in place (`options` go to
    `torch.compile`; `fullgraph=True` unless given: a graph break would be a bug)."""
    options.setdefault("fullgraph", True)
    names = set(getattr(transformer, "_repeated_blocks", None) or ("WanTransformerBlock",))
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no blocks named {sorted(names)}")
    for block in blocks:
        block.compile(**options)
