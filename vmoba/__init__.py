"""VMoBA: mixture-of-block sparse self-attention for video diffusion transformers.

```python
from vmoba import VMoBAConfig, block_ids, select_blocks, vmoba_attention
```

The settings (`VMoBAConfig`, `AttentionSettings`, the choices and defaults in `vmoba.config`)
import without torch; the names that need torch are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import AttentionSettings, VMoBAConfig, merge_attention_settings

if TYPE_CHECKING:
    from .attention import vmoba_attention
    from .partition import block_ids, num_blocks
    from .select import select_blocks

_TORCH_NAMES = {
    "vmoba_attention": ".attention",
    "block_ids": ".partition",
    "num_blocks": ".partition",
    "select_blocks": ".select",
}

__all__ = [
    "AttentionSettings",
    "VMoBAConfig",
    "block_ids",
    "merge_attention_settings",
    "num_blocks",
    "select_blocks",
    "vmoba_attention",
]


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        value = getattr(importlib.import_module(_TORCH_NAMES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_TORCH_NAMES))
