"""Compile the kernels for Hopper (sm_90a) without a GPU and report registers, spills, shared
memory and whether the matmuls became wgmma: the cheap first look before any device time.

    python -m bench.compile_report
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vmoba.kernels import attention as attn_k
from vmoba.kernels import blocked as blocked_k
from vmoba.kernels import pooling as pool_k
from vmoba.kernels import select_global as global_k
from vmoba.kernels import select_query as query_k

PTR_TYPES = {
    "q_ptr": "*bf16",
    "k_ptr": "*bf16",
    "v_ptr": "*bf16",
    "o_ptr": "*bf16",
    "km_hi_ptr": "*bf16",
    "km_lo_ptr": "*bf16",
    "acc_ptr": "*fp16",  # the running output of half-precision inputs (partial_dtype)
    "ml_ptr": "*fp32",
    "stats_ptr": "*fp32",
    "range_ptr": "*fp32",
    "att_ptr": "*fp32",
    "cand_val_ptr": "*fp32",
    "near_ptr": "*i64",
    "near_min_ptr": "*i64",
    "above_ptr": "*fp64",
    "cutoff_ptr": "*i64",
    "ids_ptr": "*i64",
    "out_ptr": "*fp32",
    "seg_start_ptr": "*i64",
    "tile_base_ptr": "*i64",
    "kb_ptr": "*bf16",
    "vb_ptr": "*bf16",
}
FLOAT_ARGS = {"qk_scale", "tau"}


def compile_for_hopper(fn, constexprs: dict, num_warps: int, num_stages: int = 3):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name.endswith("_ptr") or name.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]  # as at launch: aligned tensors, strides of D
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_desc"):
            sig[name] = f"tensordesc<bf16[{constexprs['BN']}, {constexprs['D']}]>"
        elif name.endswith("_ptr"):
            sig[name] = PTR_TYPES.get(name, "*i32")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )


def ptxas_report(kernel) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        res = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    return (
        " ".join(
            re.findall(
                r"(Used \d+ registers|\d+ bytes spill stores|\d+ bytes spill loads|"
                r"\d+ bytes smem)",
                res.stderr,
            )
        )
        or res.stderr[-400:]
    )


def main():
    cases = [
        (
            "fwd D128 BM128 BN64 w8 s2",
            attn_k.vmoba_fwd_kernel,
            dict(D=128, BM=128, BN=64, GRAB=2, IEEE=False, EARLY=False),
            8,
            2,
        ),
        (
            "fwd D128 BM128 BN128 w8 s3",
            attn_k.vmoba_fwd_kernel,
            dict(D=128, BM=128, BN=128, GRAB=2, IEEE=False, EARLY=False),
            8,
            3,
        ),
        (
            "fwd D64 BM128 BN64 w4 s3",
            attn_k.vmoba_fwd_kernel,
            dict(D=64, BM=128, BN=64, GRAB=2, IEEE=False, EARLY=False),
            4,
            3,
        ),
        (
            "fwd D128 BM64 BN64 w4 s3 early",
            attn_k.vmoba_fwd_kernel,
            dict(D=128, BM=64, BN=64, GRAB=2, IEEE=False, EARLY=True),
            4,
            3,
        ),
        ("blocked kv D128", blocked_k.vmoba_blocked_kv_kernel, dict(D=128, BR=64), 4, 1),
        ("pool D128", pool_k.vmoba_pool_kernel, dict(D=128, BT=64), 4, 1),
        (
            "query topk-iter C64",
            query_k.vmoba_query_select_kernel,
            dict(BM=64, C_PAD=64, D=128, MODE_TOPK=True, SPLIT=True, IEEE=False, TOPK_ITER=True),
            4,
            1,
        ),
        (
            "query rows C128",
            query_k.vmoba_query_select_kernel,
            dict(BM=64, C_PAD=128, D=128, MODE_TOPK=False, SPLIT=True, IEEE=False, TOPK_ITER=False),
            4,
            1,
        ),
        (
            "global hist C40",
            global_k.vmoba_global_pass_kernel,
            dict(
                BM=64,
                C_PAD=64,
                D=128,
                NB=256,
                PHASE=2,
                SPLIT=True,
                IEEE=False,
                KIND=2,
                GROUPS=1,
                TAIL=16,
            ),
            4,
            1,
        ),
        (
            "global hist2 C40",
            global_k.vmoba_global_pass_kernel,
            dict(
                BM=64,
                C_PAD=64,
                D=128,
                NB=256,
                PHASE=3,
                SPLIT=True,
                IEEE=False,
                KIND=2,
                GROUPS=1,
                TAIL=16,
            ),
            4,
            1,
        ),
        (
            "global compact C40",
            global_k.vmoba_global_pass_kernel,
            dict(
                BM=64,
                C_PAD=64,
                D=128,
                NB=256,
                PHASE=4,
                SPLIT=True,
                IEEE=False,
                KIND=2,
                GROUPS=1,
                TAIL=16,
            ),
            4,
            1,
        ),
        ("decide step 1", global_k.vmoba_decide_kernel, dict(STEP=1, NB=256, NT_PAD=2048), 4, 1),
        ("band hist", global_k.vmoba_band_hist_kernel, dict(NB=256, CHUNK=1024), 4, 1),
        ("near", global_k.vmoba_near_kernel, dict(NB=256, CHUNK=1024, NEAR=1024), 4, 1),
        ("cutoff", global_k.vmoba_cutoff_kernel, dict(NT_PAD=2048, NEAR=1024), 1, 1),
        ("patch", global_k.vmoba_patch_kernel, dict(BM=64, W=2, CHUNK=1024), 4, 1),
        (
            "global mask C40",
            global_k.vmoba_global_pass_kernel,
            dict(
                BM=64,
                C_PAD=64,
                D=128,
                NB=256,
                PHASE=5,
                SPLIT=True,
                IEEE=False,
                KIND=2,
                GROUPS=1,
                TAIL=16,
            ),
            4,
            1,
        ),
        ("count W4", attn_k.vmoba_count_kernel, dict(W=4, BLK=1024), 4, 1),
        ("scatter W4", attn_k.vmoba_scatter_kernel, dict(W=4, BLK=1024), 4, 1),
    ]
    for name, fn, const, warps, stages in cases:
        kernel = compile_for_hopper(fn, const, warps, stages)
        ptx = kernel.asm["ptx"]
        print(
            f"{name:32s} {ptxas_report(kernel)}  wgmma={'wgmma' in ptx} cp.async={'cp.async' in ptx}"
            f" tma={'cp.async.bulk.tensor' in ptx}"
        )


if __name__ == "__main__":
    main()
