"""The Triton backward against the reference's autograd on the same selection (Triton's CPU
interpreter at small sizes, or a GPU if present), and the reference's own gradients.

Tolerance: relative L2 error `|g - g_ref| / |g_ref|` of `dq, dk, dv`, per dtype (`GRAD_RTOL`):
the interpreter computes dots exactly, so fp32 is near machine precision and fp16 carries the
rounding of the inputs, the softmax weights and `dS` to fp16 for the dots (as every flash backward
does); on a GPU bf16 has 8 mantissa bits (measured at the Wan grids on an H100: dq 5.5e-3, dk and
dv 2.4e-3, bench/results/backward-check-h100*.json).
"""

import json
import math
import os

import pytest
import torch

from vmoba import VMoBAConfig, block_ids, reference, vmoba_attention
from vmoba.autograd import Saved, attention_backward, attention_forward
from vmoba.inputs import locality_qkv
from vmoba.kernels import selection
from vmoba.kernels.configs import backward_config
from vmoba.partition import block_layout

CFG = VMoBAConfig(temporal_chunk=2, spatial_chunk=(2, 3), st_chunk=(2, 3, 4), topk=(2, 3, 5))
GRID = (3, 5, 7)  # ragged blocks in every kind
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float16, torch.bfloat16) if DEVICE == "cuda" else (torch.float32, torch.float16)
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Two runs of the same backward: bit-identical in the interpreter; on a GPU dq is summed with fp32
# atomics whose order varies between runs (measured on an H100: 3 of 13,440 fp16 elements differ,
# by at most 7.6e-6), so assert_close's default fp16/bf16 tolerances there.
REPEAT_TOL: dict = dict(atol=0, rtol=0) if DEVICE == "cpu" else {}


def qkv(dtype, b=1, h=2, grid=GRID):
    d = 64 if DEVICE == "cuda" else 16
    return locality_qkv(grid, b, h, d, dtype=dtype, device=DEVICE)


def use_variant(monkeypatch, fused: bool):
    """The backward's variant (`fused_dq`: dQ made in the dK/dV kernel) through the benchmarks'
    hook `VMOBA_BWD_CONFIG`, keeping any tile override already set."""
    override = json.loads(os.environ.get("VMOBA_BWD_CONFIG", "{}"))
    monkeypatch.setenv("VMOBA_BWD_CONFIG", json.dumps({**override, "fused_dq": fused}))


def rel_l2(got, ref):
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm())


def kernel_selection(q, k, grid, layer, cfg):
    kind = cfg.kind(layer)
    layout = block_layout(grid, kind, cfg, device=q.device)
    return selection.select_bits(q.detach(), k.detach(), layout, cfg, kind).to_bool()


def reference_grads(q, k, v, grad_out, selected, ids):
    """Output and `dq, dk, dv` of the masked dense attention, fp64."""
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    out = reference.masked_attention(*leaves, selected, ids, 1 / math.sqrt(q.shape[-1]))
    return out, torch.autograd.grad(out, leaves, grad_out.double())


def triton_grads(q, k, v, grad_out, grid, layer, cfg):
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = vmoba_attention(*leaves, grid=grid, layer_idx=layer, config=cfg, kernel="triton")
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize(
    "mode,dtype,fused",
    [
        ("topk", DTYPES[0], False),
        ("threshold_query", DTYPES[1], False),
        ("threshold_global", DTYPES[1], False),
        ("topk", DTYPES[0], True),
    ],
)
def test_gradients_match_reference_in_every_kind(seed, monkeypatch, mode, dtype, fused):
    use_variant(monkeypatch, fused)
    cfg = CFG.replace(select=mode, threshold=float(torch.empty(()).uniform_(0.2, 0.6)))
    q, k, v = qkv(dtype)
    grad_out = torch.randn_like(q)
    for layer in range(3):
        out, grads = triton_grads(q, k, v, grad_out, GRID, layer, cfg)
        selected = kernel_selection(q, k, GRID, layer, cfg)
        ids = block_ids(GRID, cfg.kind(layer), cfg, device=q.device)
        ref_out, ref_grads = reference_grads(q, k, v, grad_out, selected, ids)
        assert rel_l2(out.detach(), ref_out) < GRAD_RTOL[dtype]
        for name, got, ref in zip("qkv", grads, ref_grads):
            assert got.dtype == dtype and got.shape == q.shape
            err = rel_l2(got, ref)
            assert err < GRAD_RTOL[dtype], f"layer {layer} d{name}: relative L2 {err:.2e}"


def test_function_pair_matches_autograd_and_saves_the_log_sum_exp(seed):
    """`attention_forward`/`attention_backward` (what a custom op registers) give the autograd
    path's results; `Saved.lse` is each query's log-sum-exp over its selected keys (log2, scaled).
    Two samples with one head: samples must not mix."""
    cfg = CFG.replace(select="threshold_global", threshold=0.4)
    q, k, v = qkv(DTYPES[0], b=2, h=1)
    grad_out = torch.randn_like(q)
    layer, kind = 2, cfg.kind(2)
    scale = 1 / math.sqrt(q.shape[-1])
    out, saved = attention_forward(q, k, v, grid=GRID, kind=kind, config=cfg, softmax_scale=scale)
    assert isinstance(saved, Saved) and all(isinstance(t, torch.Tensor) for t in saved)
    grads = attention_backward(
        grad_out, q, k, v, out, saved, grid=GRID, kind=kind, config=cfg, softmax_scale=scale
    )
    auto_out, auto_grads = triton_grads(q, k, v, grad_out, GRID, layer, cfg)
    torch.testing.assert_close(out, auto_out.detach(), atol=0, rtol=0)
    for got, ref in zip(grads, auto_grads):
        torch.testing.assert_close(got, ref, **REPEAT_TOL)
    selected = kernel_selection(q, k, GRID, layer, cfg)
    ids = block_ids(GRID, kind, cfg, device=q.device)
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * scale
    scores = scores.masked_fill(~selected[..., ids], -math.inf)
    lse2 = (torch.logsumexp(scores, -1) / math.log(2)).flatten(0, 1)  # [B*H, S]
    torch.testing.assert_close(saved.lse.double(), lse2, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_unselected_blocks_get_no_gradient(seed, monkeypatch, fused):
    """With an output gradient on one query only, keys of the blocks that query did not select
    get exactly zero dK and dV (no silent dense fallback), the selected ones (nearly all) do not,
    and only that query's dq is non-zero."""
    use_variant(monkeypatch, fused)
    cfg = CFG.replace(select="topk", topk=(1, 2, 3))  # of 2, 9 and 8 blocks
    q, k, v = qkv(DTYPES[0], b=1, h=2)
    for layer in range(3):
        kind = cfg.kind(layer)
        ids = block_ids(GRID, kind, cfg, device=q.device)
        selected = kernel_selection(q, k, GRID, layer, cfg)
        i0 = int(torch.randint(q.shape[1], ()))
        grad_out = torch.zeros_like(q)
        grad_out[:, i0] = torch.randn_like(q[:, i0])
        _, (dq, dk, dv) = triton_grads(q, k, v, grad_out, GRID, layer, cfg)
        attended = selected[0, :, i0][:, ids].T  # [S, H]: key j is in a block query i0 selected
        assert not attended.all(), "the test needs unselected blocks"
        for g in (dk, dv):
            per_key = g[0].abs().amax(-1)  # [S, H]
            assert (per_key[~attended] == 0).all()
            # selected keys get gradients, but a key of tiny weight can round to zero in fp16
            # (seen on an H100: dk of 1e-6 next to exact zeros)
            assert (per_key[attended] > 0).float().mean() > 0.9
        others = torch.ones(q.shape[1], dtype=torch.bool, device=q.device)
        others[i0] = False
        assert (dq[:, others] == 0).all() and (dq[:, i0] != 0).any()


def test_backward_config_override(monkeypatch):
    """`VMOBA_BWD_CONFIG` sets the variant and merges tile changes into the defaults (the
    benchmarks record it); an unknown key is an error, not a silently ignored typo."""
    for interpreter in (True, False):
        monkeypatch.delenv("VMOBA_BWD_CONFIG", raising=False)
        default = backward_config(interpreter)
        other = not default["fused_dq"]
        override = {"fused_dq": other, "dkdv": {"BM": 8}}
        monkeypatch.setenv("VMOBA_BWD_CONFIG", json.dumps(override))
        cfg = backward_config(interpreter)
        assert cfg["fused_dq"] is other and cfg["dq"] == default["dq"]
        assert cfg["dkdv"] == {**default["dkdv"], "BM": 8}
        monkeypatch.setenv("VMOBA_BWD_CONFIG", '{"fuse_dq": true}')
        with pytest.raises(ValueError, match="fuse_dq"):
            backward_config(interpreter)


def test_reference_gradcheck_fp64(seed):
    """The reference twin's gradients (the ground truth above) against finite differences, on a
    3D selection that leaves blocks out."""
    grid = (2, 2, 3)
    cfg = CFG.replace(select="topk", st_chunk=(1, 1, 2), topk=(1, 1, 3))
    q, k, v = (x.requires_grad_(True) for x in locality_qkv(grid, 1, 1, 4, dtype=torch.float64))
    ids = block_ids(grid, "3d", cfg)
    c = int(ids.max()) + 1
    gates = reference.gate(q.detach(), k.detach(), ids, c)
    selected = reference.select_from_gate(gates, ids, "topk", tau=0.0, k=3)
    assert not selected.all()
    assert torch.autograd.gradcheck(
        lambda q, k, v: reference.masked_attention(q, k, v, selected, ids, 0.5), (q, k, v)
    )


def test_inference_saves_nothing_and_gives_the_same_output(seed):
    """Grad mode off (or no input requiring grad): the inference path, no graph; grad on: the
    autograd op, same output, and `stats` still reported."""
    cfg = CFG.replace(select="threshold_global", threshold=0.3)
    q, k, v = qkv(DTYPES[0])
    leaf = q.detach().requires_grad_(True)
    with torch.no_grad():
        plain = vmoba_attention(leaf, k, v, grid=GRID, layer_idx=1, config=cfg, kernel="triton")
    assert plain.grad_fn is None
    stats: dict = {}
    out = vmoba_attention(
        leaf, k, v, grid=GRID, layer_idx=1, config=cfg, kernel="triton", stats=stats
    )
    assert out.grad_fn is not None
    torch.testing.assert_close(out.detach(), plain, atol=0, rtol=0)
    selected = kernel_selection(q, k, GRID, 1, cfg)
    ids = block_ids(GRID, "2d", cfg, device=q.device)
    assert float(stats["attended"]) == float(selected[..., ids].sum())


def test_compiled_training_traces_the_ops_in_one_graph():
    """`torch.compile(fullgraph=True)` of a forward and backward through `vmoba_attention`: the
    custom ops (`vmoba::sparse_attention_fwd` with its registered autograd, `..._bwd`) trace
    without a graph break and give eager's gradients; `opcheck` checks the op's registrations."""
    cfg = CFG.replace(select="topk")
    q, k, v = qkv(DTYPES[0])
    grad_out = torch.randn_like(q)

    def step(q, k, v):
        out = vmoba_attention(q, k, v, grid=GRID, layer_idx=2, config=cfg, kernel="triton")
        return (out * grad_out).sum()

    def grads(fn):
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        fn(*leaves).backward()
        return [x.grad for x in leaves]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(grads(compiled), grads(step)):
        torch.testing.assert_close(got, want, **REPEAT_TOL)
    args = (list(GRID), "3d", [2, 2, 3, 2, 3, 4], "topk", 0.25, [2, 3, 5], 0.25)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    torch.library.opcheck(
        torch.ops.vmoba.sparse_attention_fwd.default,
        (*leaves, *args),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
