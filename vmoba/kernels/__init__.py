"""Triton kernels of VMoBA, each module with its host (launch) code beside its kernels.

- `common`: host checks and the Triton helpers both selections use (query tile, gate scores,
  bit words);
- `pooling`: block-mean pooling (`block_means`);
- `select_query`: per-query selection (`topk`, `threshold_query`);
- `select_global`: `threshold_global`'s passes and its host loop;
- `selection`: `select_bits` (pooling, then one of the two) and the `Selection` it returns;
- `attention`: the query index and the sparse attention (`attend`, `sparse_attention`);
- `configs`: tuning data (block sizes, warps, stages).
"""
