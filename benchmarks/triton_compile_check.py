"""Compile the fused Triton kernels for a Hopper GPU (sm_90) on a machine without one, and report what a lease
would otherwise spend minutes finding out: registers and stack bytes (spills) of the machine code Triton builds
(``cuobjdump --dump-resource-usage``, the copy Triton ships), and in the PTX the width of the global loads and
whether the attention's products use tensor cores (``mma``) or fp32 FMAs.

    python benchmarks/triton_compile_check.py                  # EDT-B's shapes, the default tiles
    python benchmarks/triton_compile_check.py --fp32-products tf32x3
    EDTIR_LINEAR_BLOCKS=128,64,64,4 python benchmarks/triton_compile_check.py    # other tiles (kernels.py names)

Pointers are declared 16-byte aligned, as Triton specialises them at launch for PyTorch's allocations.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter


def report(name, kernel, cuobjdump) -> None:
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])  # what Triton's own ptxas made of the PTX
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    loads = Counter(re.findall(r"ld\.global(?:\.v\d)?\.b\d+", ptx))
    mma = len(re.findall(r"\bmma\.sync\.", ptx)) + len(re.findall(r"\bwgmma\.", ptx))
    fma = len(re.findall(r"\bfma\.rn\.f32\b", ptx))
    print(f"{name:<52}{regs.group(1) if regs else '?':>6}{stack.group(1) if stack else '?':>7}{mma:>6}{fma:>6}  "
          + ", ".join(f"{k} x{v}" for k, v in sorted(loads.items())))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32-products", choices=("ieee", "tf32x3"), default="ieee",
                    help="how the kernels multiply fp32 inputs (EDTIR_FP32_PRODUCTS)")
    args = ap.parse_args()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        print("Triton is not installed here (pip install -e '.[test]')", file=sys.stderr)
        return 2
    from edtir.models import kernels as K

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        print(f"no cuobjdump at {cuobjdump}", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", 90, 32)
    def build(fn, signature, constants, warps, stages=3):
        pointers = [i for i, t in enumerate(signature.values()) if t.startswith("*")]
        aligned = {(i,): [["tt.divisibility", 16]] for i in pointers}
        source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned)
        return triton.compile(source, target=target, options={"num_warps": warps, "num_stages": stages})

    print(f"# Triton {triton.__version__}, sm_90; EDT-B: 6 heads of 15 (padded 16), windows 6x24, hidden 360")
    print(f"{'kernel':<52}{'regs':>6}{'stack':>7}{'mma':>6}{'fma':>6}  global loads (PTX)")
    bm, bn, aw = K.ATTENTION_BLOCKS
    dw, dc, dwarps = K.DWCONV_BLOCKS
    for dt in ("bf16", "fp32"):
        sig = {"qkv_ptr": f"*{dt}", "out_ptr": f"*{dt}", "lw_ptr": "*fp32", "lb_ptr": "*fp32", "H": "i32",
               "W": "i32", "s_h0": "i32", "s_h1": "i32"}
        consts = {"HEADS": 6, "D": 16, "WH": 6, "WW": 24, "SHIFTED": True, "BLOCK_M": bm, "BLOCK_N": bn,
                  "DOT_F32": dt == "fp32", "F32_PREC": args.fp32_products}
        sig.update({k: "constexpr" for k in consts})
        report(f"attention {dt}, shifted, tiles {(bm, bn, aw)}", build(K._window_attention_kernel, sig, consts, aw),
               cuobjdump)
        sig = {"x_ptr": f"*{dt}", "w_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": f"*{dt}", "H": "i32", "W": "i32"}
        consts = {"CH": 360, "K": 5, "BLOCK_W": dw, "BLOCK_C": dc}
        sig.update({k: "constexpr" for k in consts})
        report(f"dwconv + GELU {dt}, tiles {(dw, dc, dwarps)}", build(K._dwconv_gelu_kernel, sig, consts, dwarps),
               cuobjdump)
        for rows in (2, 4):
            report(f"dwconv + GELU {dt}, {rows} rows, tiles {(dw, dc, dwarps)}",
                   build(K._dwconv_gelu_rows_kernel, {**{k: v for k, v in sig.items() if k not in consts},
                                                      **{k: "constexpr" for k in ("CH", "K", "ROWS", "BLOCK_W",
                                                                                  "BLOCK_C")}},
                         dict(consts, ROWS=rows), dwarps), cuobjdump)
        sig = {"x_ptr": "*fp32", "y_ptr": f"*{dt}", "sum_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32",
               "out_ptr": f"*{dt}", "M": "i32", "eps": "fp32"}
        consts = {"C": 180, "YS": 184, "CP": 192, "HAS_Y": True, "BLOCK_R": 8, "BLOCK_C": 256}
        sig.update({k: "constexpr" for k in consts})
        report(f"add + layer norm {dt}", build(K._layer_norm_kernel, sig, consts, 4), cuobjdump)
        tiles = K.LINEAR_BLOCKS_FP32 if dt == "fp32" else K.LINEAR_BLOCKS
        lm, ln, lk, lwarps = tiles
        for name, k, n, gelu, res in (("fc1 + GELU", 192, 360, True, False), ("fc2 + residual", 360, 180, False, True)):
            sig = {"a_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": "*fp32", "r_ptr": "*fp32",
                   "out_ptr": "*fp32" if res else f"*{dt}", "M": "i32"}
            consts = {"K": k, "N": n, "LDW": n + (-n % 8), "GELU": gelu, "RESIDUAL": res, "DOT_F32": dt == "fp32",
                      "F32_PREC": args.fp32_products, "BLOCK_M": lm, "BLOCK_N": ln, "BLOCK_K": lk}
            sig.update({c: "constexpr" for c in consts})
            report(f"{name} {dt}, {tiles}", build(K._linear_kernel, sig, consts, lwarps), cuobjdump)
        tiles = K.NORM_LINEAR_BLOCKS_FP32 if dt == "fp32" else K.NORM_LINEAR_BLOCKS
        nm, nn, nwarps = tiles
        sig = {"x_ptr": "*fp32", "y_ptr": f"*{dt}", "sum_ptr": "*fp32", "nw_ptr": "*fp32", "nb_ptr": "*fp32",
               "w_ptr": f"*{dt}", "b_ptr": "*fp32", "out_ptr": f"*{dt}", "M": "i32", "eps": "fp32"}
        consts = {"C": 180, "YS": 184, "N": 360, "LDW": 360, "HAS_Y": True, "GELU": True, "DOT_F32": dt == "fp32",
                  "F32_PREC": args.fp32_products, "BLOCK_M": nm, "BLOCK_N": nn, "BLOCK_C": 256}
        sig.update({c: "constexpr" for c in consts})
        report(f"add + norm2 + fc1 + GELU {dt}, {tiles}",
               build(K._norm_linear_kernel, sig, consts, nwarps), cuobjdump)
    return 0


if __name__ == "__main__":
    sys.exit(main())
