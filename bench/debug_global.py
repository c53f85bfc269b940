"""Dump the threshold_global selection's intermediate state on a GPU next to torch's numbers
(a diagnosis aid: `python -m bench.debug_global`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vmoba import VMoBAConfig, block_ids, num_blocks, reference, select_blocks
from vmoba.inputs import locality_qkv
from vmoba.kernels import gate as gate_k
from vmoba.kernels import launch
from vmoba.partition import block_layout


@triton.jit
def _hist_probe(x_ptr, out_ptr, BM: tl.constexpr, C: tl.constexpr, NB: tl.constexpr, MODE: tl.constexpr):
    o_m = tl.arange(0, BM)
    o_c = tl.arange(0, C)
    x = tl.load(x_ptr + o_m[:, None] * C + o_c[None, :])  # int32 bins [BM, C]
    keep = ((o_c[None, :] % 3) != 0) & (o_m[:, None] >= 0)
    if MODE == 0:
        h = tl.histogram(tl.reshape(x, [BM * C]), NB)
    elif MODE == 1:
        h = tl.histogram(tl.reshape(x, [BM * C]), NB, mask=tl.reshape(keep, [BM * C]))
    else:
        h = tl.histogram(tl.reshape(x, [BM * C]), NB, mask=tl.reshape(keep & (x >= 0), [BM * C]))
    tl.atomic_add(out_ptr + tl.arange(0, NB), h)


def histogram_probe():
    bm, c, nb = 64, 32, 256
    x = torch.randint(0, nb, (bm, c), device="cuda", dtype=torch.int32)
    keep = (torch.arange(c, device="cuda") % 3 != 0).expand(bm, c)
    for mode in range(3):
        out = torch.zeros(nb, device="cuda", dtype=torch.int32)
        _hist_probe[(1,)](x, out, BM=bm, C=c, NB=nb, MODE=mode, num_warps=4)
        ref = torch.bincount((x if mode == 0 else x[keep]).flatten().long(), minlength=nb).int()
        print("histogram probe mode", mode, "sum", int(out.sum()), "ref", int(ref.sum()),
              "equal", bool(torch.equal(out, ref)), "first bins", out[:8].tolist(), ref[:8].tolist())


def main():
    histogram_probe()
    grid = (3, 5, 7)
    cfg = VMoBAConfig(temporal_chunk=2, spatial_chunk=(2, 3), st_chunk=(2, 3, 4), select="threshold_global",
                      threshold=0.3)
    q, k, _ = locality_qkv(grid, 1, 2, 64, dtype=torch.bfloat16, device="cuda")
    kind = "2d"
    layout = block_layout(grid, kind, cfg, device="cuda")
    c = layout.num_blocks
    ids = block_ids(grid, kind, cfg, device="cuda")
    g = reference.gate(q, k, ids, c)  # [B, H, S, C]
    n = reference.normalise(g, (-2, -1))
    smask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, ids.view(1, 1, -1, 1).expand(1, 2, -1, 1), True)
    print("torch lo/hi", g.amin((-2, -1)).flatten().tolist(), g.amax((-2, -1)).flatten().tolist())
    print("torch tot/self/need", n.sum((-2, -1)).flatten().tolist(), (n * smask).sum((-2, -1)).flatten().tolist(),
          (0.3 * n.sum((-2, -1)) - (n * smask).sum((-2, -1))).flatten().tolist())
    others = n[~smask.expand_as(n)].view(1, 2, -1)
    print("torch hist1 sum", [int(torch.histc(others[0, h].float(), 256, 0, 1).sum()) for h in range(2)])

    # replay select_bits step by step
    b, s, h, d = q.shape
    c_pad = max(32, triton.next_power_of_2(c))
    cfgk = launch.gate_config(c_pad, d, False)
    bm = cfgk["BM"]
    n_tiles = triton.cdiv(s, bm)
    bh = b * h
    hi, lo, split = launch.gate_operands(launch.block_means(k, layout), q.dtype, c_pad)
    bits = torch.zeros(b, h, s, c_pad // 32, device="cuda", dtype=torch.int32)
    attended = torch.zeros(bh, n_tiles, device="cuda")
    stats = torch.zeros(bh, n_tiles, 4, device="cuda")
    ranges = torch.zeros(bh, 8, device="cuda")
    hist = torch.zeros(bh, 256, device="cuda", dtype=torch.int32)
    cap = cfgk["CAP"]
    cand = torch.zeros(bh, cap, device="cuda", dtype=torch.int64)
    cand_n = torch.zeros(bh, device="cuda", dtype=torch.int32)
    cutoff = torch.zeros(bh, device="cuda", dtype=torch.int64)

    def gate_pass(phase):
        gate_k.vmoba_gate_kernel[(n_tiles, bh)](
            q, hi, lo, layout.ids, layout.lengths, bits, attended, stats, ranges, hist,
            cand, cand_n, cutoff, layout.geometry, q.stride(0), q.stride(1), q.stride(2),
            h, s, c, n_tiles, 0.3, 1, cap, 0,
            BM=bm, C_PAD=c_pad, D=d, NB=256, PHASE=phase, MODE_TOPK=False, SPLIT=split, IEEE=False, KIND=2)

    def decide(step):
        gate_k.vmoba_decide_kernel[(bh,)](hist, stats, ranges, cand, cand_n, cutoff, n_tiles, 0.3, cap,
                                          STEP=step, NB=256, NT_PAD=triton.next_power_of_2(n_tiles),
                                          CAP_PAD=triton.next_power_of_2(cap))

    gate_pass(1)
    print("pass1 stats", stats[..., :2].tolist())
    gate_k.vmoba_range_kernel[(bh,)](stats, ranges, n_tiles, NT_PAD=triton.next_power_of_2(n_tiles))
    print("ranges after range kernel", ranges.tolist())
    gate_pass(2)
    print("pass2 stats", stats[..., :2].tolist(), "hist sums", hist.sum(1).tolist())
    ncut = n.clone()
    kernel_hist = hist.clone()
    for hh in range(2):
        vals = n[0, hh][~smask[0, hh]].float()
        ref_h = torch.histc(vals, 256, 0, 1).int()
        print("head", hh, "hist equal", bool(torch.equal(ref_h, kernel_hist[hh])), "nonzero kernel bins",
              kernel_hist[hh].nonzero().flatten()[:20].tolist(), "ref", ref_h.nonzero().flatten()[:20].tolist())
    decide(1)
    print("ranges after decide1", ranges.tolist())
    hist.zero_()
    gate_pass(3)
    print("pass3 above", stats[..., 0].tolist(), "hist sums", hist.sum(1).tolist())
    decide(2)
    print("ranges after decide2", ranges.tolist())
    gate_pass(4)
    print("pass4 above", stats[..., 0].tolist(), "cand_n", cand_n.tolist())
    decide(3)
    print("cutoff", cutoff.tolist(), "cand max", cand.max(1).values.tolist())
    gate_pass(5)
    sel = launch.Selection(bits=bits, attended=attended, layout=layout).to_bool()
    ref = select_blocks(q, k, grid=grid, layer_idx=1, config=cfg, backend="reference")
    print("selected", int(sel.sum()), "reference", int(ref.sum()), "differ", int((sel != ref).sum()))
    _ = num_blocks


if __name__ == "__main__":
    main()
