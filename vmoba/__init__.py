"""VMoBA: mixture-of-block sparse self-attention for video diffusion transformers.

```python
from vmoba import VMoBAConfig, block_ids, select_blocks, vmoba_attention
```
"""

from .attention import vmoba_attention
from .config import VMoBAConfig
from .partition import block_ids, num_blocks
from .select import select_blocks

__all__ = ["VMoBAConfig", "block_ids", "num_blocks", "select_blocks", "vmoba_attention"]
