"""The fused Triton kernels of ``edtir.models.kernels`` at EDT-B's shapes on a GPU: each kernel's tile sizes swept,
each against the eager PyTorch it replaces, and one whole transformer block fused against eager.

    python benchmarks/triton_kernels.py                       # EDT-B x2 at 240x360 (the issue's workload)
    python benchmarks/triton_kernels.py --hw 120x180 --size T
    python benchmarks/triton_kernels.py --env best.env        # also write the fastest tiles as environment lines

Times are medians of ``triton.testing.do_bench`` (CUDA events) in ms; "GB/s" counts the bytes each kernel must move
at the least (inputs read once, output written once). Every variant's output is checked against the first one.
``--env`` writes ``EDTIR_ATTENTION_BLOCKS=...``, ``EDTIR_DWCONV_BLOCKS=...`` and ``EDTIR_LINEAR_BLOCKS=...`` (read by
``edtir.models.kernels``),
so a later run in the same lease can use the tiles that won here.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ATTENTION_TILES = [(32, 16, 4), (64, 16, 4), (64, 32, 4), (64, 16, 8), (128, 16, 8), (128, 32, 8), (32, 16, 2)]
DWCONV_TILES = [(16, 64, 4), (16, 32, 2), (32, 32, 4), (8, 128, 4), (16, 128, 4), (32, 64, 4), (32, 128, 8),
                (64, 64, 8)]
#: the depthwise conv with 2 or 4 output rows per program (EDTIR_DWCONV_ROWS): (W, C, warps, rows)
DWCONV_ROW_TILES = [(16, 128, 4, 2), (16, 128, 4, 4), (16, 64, 4, 2), (16, 64, 4, 4), (16, 128, 8, 2),
                    (16, 128, 8, 4), (32, 64, 4, 2), (32, 64, 4, 4), (32, 128, 8, 4)]

# per precision; the tiles that spill registers on sm_90 are left out (benchmarks/triton_compile_check.py)
LINEAR_TILES = {"bf16": [(128, 128, 64, 8), (128, 64, 64, 4), (64, 128, 64, 4), (128, 128, 64, 4), (64, 64, 64, 4),
                         (128, 64, 32, 4)],
                "fp32": [(128, 64, 32, 8), (64, 64, 32, 4), (64, 64, 64, 4), (128, 128, 64, 8)]}
NORM_LINEAR_TILES = {"bf16": [(64, 64, 8), (64, 128, 8), (32, 64, 4), (32, 128, 4)],
                     "fp32": [(16, 64, 8), (16, 32, 4)]}


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def tile_table(title, label, run, tiles, moved):
    """Time ``run(tiles)`` for each tile choice; print a row each; return the fastest choice and its output."""
    print(f"\n## {title}")
    print(f"{label:<24}{'ms':>9}{'GB/s':>9}  check")
    first, rows = None, []
    for t in tiles:
        try:
            out = run(t).float()
            first = out if first is None else first
            ms = bench(partial(run, t))
            rows.append((ms, t))
            print(f"{str(t):<24}{ms:9.3f}{moved / ms / 1e6:9.0f}  {(out - first).abs().max().item():.1e}")
        except Exception as e:  # a tile that does not compile here (shared memory, registers)
            print(f"{str(t):<24}{'-':>9}{'-':>9}  {type(e).__name__}: {str(e)[:80]}")
    return (min(rows)[1] if rows else None), first


def sweep(prec, blk, x, layout) -> dict:
    """One precision: the attention and conv kernels' tiles, the eager code beside them, one whole block."""
    from edtir.models import edt, kernels

    a = blk.attns[0]
    heads, hd = a.heads, a.head_dim
    D = kernels.head_pad(hd)
    H, W = x.shape[1:3]
    best = {}
    w, b = blk.qkv_weight((D, D), scale_q=True)
    qkv = edt.linear(blk.qkv, kernels.layer_norm(x, blk.norm1), weight=w, bias=b)
    lw, lb = kernels.lepe_weights(blk)
    moved = qkv.numel() * qkv.element_size() + H * W * 2 * heads * D * qkv.element_size()
    win, _ = tile_table(f"{prec}: attention kernel (qkv {tuple(qkv.shape)} {qkv.dtype})", "tiles (M, N, warps)",
                        lambda t: kernels.window_attention(qkv, (1, H, W), a.window, blk.shift_h, heads, hd, lw, lb,
                                                           blocks=t), ATTENTION_TILES, moved)
    if win and prec == "bf16":
        best["EDTIR_ATTENTION_BLOCKS"] = ",".join(map(str, win))
    if win and prec == "fp32":  # full-precision products against three TF32 products on tensor cores
        ref = kernels.reference_window_attention(qkv, (1, H, W), a.window, blk.shift_h, heads, hd, lw, lb)
        for how in ("ieee", "tf32x3"):
            run = partial(kernels.window_attention, qkv, (1, H, W), a.window, blk.shift_h, heads, hd, lw, lb,
                          blocks=win, fp32_products=how)
            err = (kernels.unpad(run(), heads, hd) - ref).abs().max().item()
            print(f"fp32 products {how:<7} tiles {win}: {bench(run):.3f} ms, max |out - plain PyTorch| {err:.1e}")
    # what it replaces: the eager fast path's norm, qkv, gather, SDPA, LePE conv and scatter
    with kernels.enabled(False):
        t_eager = bench(lambda: blk.attention_fast(blk.norm1(x), layout))
    t_ln = bench(lambda: blk.norm1(x))
    t_lnk = bench(lambda: kernels.layer_norm(x, blk.norm1))
    t_qkv = bench(lambda: edt.linear(blk.qkv, kernels.layer_norm(x, blk.norm1), weight=w, bias=b))
    print(f"eager attention_fast (norm, qkv, gather, SDPA, LePE, scatter): {t_eager:.3f} ms; its norm {t_ln:.3f} ms; "
          f"fused norm {t_lnk:.3f} ms; fused norm + qkv product {t_qkv:.3f} ms")
    # the products that read a norm's output: K = C (180 for EDT-B) against K padded to 16 (192)
    C = x.shape[-1]
    wide = kernels.width_pad(C)
    xn, xw = kernels.layer_norm(x, blk.norm1), kernels.layer_norm(x, blk.norm1, width=wide)
    times = []
    for name, wt, bias in (("qkv", w, b), ("fc1", blk.mlp.fc1.weight, blk.mlp.fc1.bias)):
        wt = wt.to(xn.dtype)
        wt_wide = F.pad(wt, (0, wide - C))
        times.append(f"{name} K={C} {bench(lambda wt=wt, bias=bias: F.linear(xn, wt, bias.to(xn.dtype))):.3f} ms, "
                     f"K={wide} {bench(lambda wt=wt_wide, bias=bias: F.linear(xw, wt, bias.to(xn.dtype))):.3f} ms")
    print("products: " + "; ".join(times))

    h = edt.linear(blk.mlp.fc1, kernels.layer_norm(x, blk.norm2), gelu=True)  # the FFN's middle
    conv = blk.mlp.dwconv
    laid = kernels.dwconv_weights(conv.weight, conv.bias)  # as the block keeps them: the kernel alone is timed
    win, fused = tile_table(f"{prec}: depthwise 5x5 conv + GELU (map {tuple(h.shape)} {h.dtype})",
                            "tiles (W, C, warps, rows)",
                            lambda t: kernels.dwconv_gelu(h, conv.weight, conv.bias, blocks=t[:3],
                                                          rows=t[3] if len(t) > 3 else 1, laid=laid),
                            DWCONV_TILES + DWCONV_ROW_TILES, 2 * h.numel() * h.element_size())
    if win and prec == "bf16":
        best["EDTIR_DWCONV_BLOCKS"] = ",".join(map(str, win[:3]))
        best["EDTIR_DWCONV_ROWS"] = str(win[3] if len(win) > 3 else 1)
    ref = F.gelu(conv(h.permute(0, 3, 1, 2).contiguous())).permute(0, 2, 3, 1)
    t_ref = bench(lambda: F.gelu(conv(h.permute(0, 3, 1, 2).contiguous())))
    t_cl = bench(lambda: F.gelu(conv(h.permute(0, 3, 1, 2))))
    diff = (fused - ref.float()).abs().max().item() if fused is not None else float("nan")
    print(f"eager: NCHW copy + conv + GELU {t_ref:.3f} ms, channels-last conv + GELU {t_cl:.3f} ms; "
          f"max |fused - eager| {diff:.1e}")

    suffix = "_FP32" if prec == "fp32" else ""  # the product kernels keep a tile choice per precision
    win = product_sweep(prec, blk, x, h)
    if win:
        best["EDTIR_LINEAR_BLOCKS" + suffix] = ",".join(map(str, win))
    win = norm_product_sweep(prec, blk, x)
    if win:
        best["EDTIR_NORM_LINEAR_BLOCKS" + suffix] = ",".join(map(str, win))

    with kernels.enabled(False):  # one whole block
        t_eager = bench(lambda: blk(x, layout))
        y_eager = blk(x, layout).float()
    fused = {}
    for products in ("none", "ffn", "all", "norms"):
        with kernels.settings(products, "tf32x3" if prec == "fp32" and products != "none" else None):
            fused[products] = (bench(lambda: blk(x, layout)), (blk(x, layout).float() - y_eager).abs().max().item())
    fp32_note = " (fp32: TF32x3 in the Triton kernels)" if prec == "fp32" else ""
    print(f"\n## {prec}: one shifted block: eager fast {t_eager:.3f} ms; fused, products in cuBLAS / fc1+fc2 in "
          f"Triton / all four in Triton / with the norms inside{fp32_note}: "
          + " / ".join(f"{t:.3f} ms ({t_eager / t:.2f}x, max |fused - eager| {d:.1e})" for t, d in fused.values()))
    return best


def norm_product_sweep(prec, blk, x):
    """The norm inside the product (kernels.norm_linear) against the norm kernel + cuBLAS (+ GELU): norm1 + qkv,
    and residual add + norm2 + fc1 + GELU, for each tile. Returns the tile with the least time for both."""
    from edtir.models import kernels

    wq, bq, _, _, w1, b1, *_ = blk.fused_weights(kernels.out_dtype(x), x.device)
    wqt, bqf, w1t, b1f = kernels.product_weights((wq, bq), (w1, b1))
    width = wq.shape[1]
    y = torch.randn_like(x)
    how = "tf32x3" if prec == "fp32" else None
    t_qkv = bench(lambda: F.linear(kernels.layer_norm(x, blk.norm1, width=width), wq, bq))
    t_fc1 = bench(lambda: F.gelu(F.linear(kernels.layer_norm(x, blk.norm2, add=y, width=width)[1], w1, b1)))
    ref_q = F.linear(kernels.layer_norm(x, blk.norm1, width=width), wq, bq).float()
    ref_1 = F.gelu(F.linear(kernels.layer_norm(x, blk.norm2, add=y, width=width)[1], w1, b1)).float()
    print(f"\n## {prec}: norms inside the products (norm1 + qkv -> {wq.shape[0]}; add + norm2 + fc1 + GELU -> "
          f"{w1.shape[0]}){' with TF32x3 products' if how else ''}")
    print(f"norm kernel + cuBLAS (+ GELU): qkv {t_qkv:.3f} ms, fc1 {t_fc1:.3f} ms, sum {t_qkv + t_fc1:.3f} ms")
    print(f"{'tiles (M, N, warps)':<24}{'qkv ms':>9}{'fc1 ms':>9}{'sum':>9}  max |fused - unfused| qkv, fc1")
    rows = []
    for t in NORM_LINEAR_TILES[prec]:
        try:
            fq = partial(kernels.norm_linear, x, blk.norm1, wqt, bqf, wq.shape[0], blocks=t, fp32_products=how)
            f1 = partial(kernels.norm_linear, x, blk.norm2, w1t, b1f, w1.shape[0], gelu=True, add=y, blocks=t,
                         fp32_products=how)
            dq, d1 = (fq().float() - ref_q).abs().max().item(), (f1()[1].float() - ref_1).abs().max().item()
            mq, m1 = bench(fq), bench(f1)
            rows.append((mq + m1, t))
            print(f"{str(t):<24}{mq:9.3f}{m1:9.3f}{mq + m1:9.3f}  {dq:.1e}, {d1:.1e}")
        except Exception as e:  # a tile that does not compile here (shared memory, registers)
            print(f"{str(t):<24}{'-':>9}{'-':>9}{'-':>9}  {type(e).__name__}: {str(e)[:80]}")
    return min(rows)[1] if rows else None


def product_sweep(prec, blk, x, h):
    """The product kernel with its epilogues (kernels.linear) against cuBLAS and the elementwise pass it saves:
    fc1 + GELU and fc2 + bias + residual for each tile (bf16; in fp32 with TF32x3 products), qkv and proj with the
    fastest. Returns the tile with the least fc1 + fc2 time."""
    from edtir.models import kernels

    wq, bq, wp, bp, w1, b1, w2, b2, *_ = blk.fused_weights(kernels.out_dtype(x), x.device)
    wqt, bqf, wpt, bpf, w1t, b1f, w2t, b2f = kernels.product_weights((wq, bq), (wp, bp), (w1, b1), (w2, b2))
    C = x.shape[-1]
    xw = kernels.layer_norm(x, blk.norm2, width=wq.shape[1])  # fc1's input, 16-aligned wide
    h = h.to(xw.dtype)
    how = "tf32x3" if prec == "fp32" else None
    t_fc1 = bench(lambda: F.gelu(F.linear(xw, w1, b1)))
    t_fc2 = bench(lambda: x + F.linear(h, w2, b2)[..., :C])
    ref1, ref2 = F.gelu(F.linear(xw, w1, b1)).float(), (x + F.linear(h, w2, b2)[..., :C]).float()
    print(f"\n## {prec}: products with their epilogues (fc1 {tuple(xw.shape)} -> {w1.shape[0]} + GELU; fc2 "
          f"{tuple(h.shape)} -> {C} + bias + residual){' with TF32x3 products' if how else ''}")
    print(f"cuBLAS + elementwise: fc1 + GELU {t_fc1:.3f} ms, fc2 + residual add {t_fc2:.3f} ms, "
          f"sum {t_fc1 + t_fc2:.3f} ms")
    print(f"{'tiles (M, N, K, warps)':<24}{'fc1 ms':>9}{'fc2 ms':>9}{'sum':>9}  max |Triton - cuBLAS| fc1, fc2")
    rows = []
    for t in LINEAR_TILES[prec]:
        try:
            f1 = partial(kernels.linear, xw, w1t, b1f, w1.shape[0], gelu=True, blocks=t, fp32_products=how)
            f2 = partial(kernels.linear, h, w2t, b2f, C, residual=x, blocks=t, fp32_products=how)
            d1, d2 = ((f1().float() - ref1).abs().max().item(), (f2().float() - ref2).abs().max().item())
            m1, m2 = bench(f1), bench(f2)
            rows.append((m1 + m2, t))
            print(f"{str(t):<24}{m1:9.3f}{m2:9.3f}{m1 + m2:9.3f}  {d1:.1e}, {d2:.1e}")
        except Exception as e:  # a tile that does not compile here (shared memory, registers)
            print(f"{str(t):<24}{'-':>9}{'-':>9}{'-':>9}  {type(e).__name__}: {str(e)[:80]}")
    if not rows:
        return None
    win = min(rows)[1]
    xq = kernels.layer_norm(x, blk.norm1, width=wq.shape[1])
    y = torch.zeros(*x.shape[:-1], wp.shape[1], dtype=xq.dtype, device=x.device)
    times = [(name, bench(lambda a=a, w=w, b=b: F.linear(a, w, b)),
              bench(partial(kernels.linear, a, wt, bf, n, blocks=win, fp32_products=how)))
             for name, a, w, b, wt, bf, n in (("qkv", xq, wq, bq, wqt, bqf, wq.shape[0]),
                                              ("proj", y, wp, bp, wpt, bpf, C))]
    print(f"tiles {win}: " + "; ".join(f"{n} cuBLAS {c:.3f} ms, Triton {t:.3f} ms" for n, c, t in times))
    return win


def hw_arg(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW, e.g. 240x360") from None
    if h <= 0 or w <= 0 or h % 24 or w % 24:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be positive multiples of 24 (the windows)")
    return h, w


def precisions_arg(text: str) -> list[str]:
    names = [p for p in text.split(",") if p]
    bad = [p for p in names if p not in ("bf16", "fp32")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of bf16, fp32")
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="B", choices=("T", "S", "B", "L"), help="EDT size")
    ap.add_argument("--hw", default="240x360", type=hw_arg,
                    help="token map, HxW, multiples of 24 (SR x2's LR input size)")
    ap.add_argument("--precisions", default="bf16,fp32", type=precisions_arg, help="comma list of bf16, fp32")
    ap.add_argument("--env", help="write the fastest tiles (bf16; the product kernels' also fp32) to this file as "
                         "KEY=value lines")
    ap.add_argument("--sweep", default="all", choices=("all", "products"),
                    help="products: sweep the product kernel's tiles only; the attention and conv kernels keep "
                         "their current tiles (edtir.models.kernels), which earlier sweeps chose")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from edtir.models import edt, kernels

    if not kernels.available():
        print("Triton is not importable here", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.sweep == "products":
        global ATTENTION_TILES, DWCONV_TILES
        ATTENTION_TILES, DWCONV_TILES = [kernels.ATTENTION_BLOCKS], [kernels.DWCONV_BLOCKS]  # rows: all swept
    H, W = args.hw
    torch.manual_seed(0)
    model = edt.build_model(args.size, ["sr-x2"], drop_path=0.0).cuda().eval()
    blk = model.body.layers[0].residual_group.blocks[1]  # a shifted block
    a = blk.attns[0]
    C = blk.norm1.normalized_shape[0]
    x = torch.randn(1, H, W, C, device="cuda")
    layout = model.body.layouts(H, W, x.device)
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; EDT-{args.size} block, {H}x{W} tokens, "
          f"C {C}, {a.heads} heads of {a.head_dim} (padded {kernels.head_pad(a.head_dim)}) per branch, "
          f"window {a.window}")
    best = {}
    for prec in args.precisions:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec == "bf16"):
            best.update(sweep(prec, blk, x, layout))
    if args.env and best:  # a temporary file renamed into place: never a half-written file
        from edtir.data.io import atomic_write_bytes

        lines = "".join(f"{k}={v}\n" for k, v in best.items()).encode()
        atomic_write_bytes(args.env, lambda tmp: Path(tmp).write_bytes(lines))
        print("\n# fastest tiles (bf16): " + ", ".join(f"{k}={v}" for k, v in best.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
