"""Why the CPU kernels fuse a whole block: the matrix products of EDT's layers on a whole map against the same
products on rows that stay in cache, oneDNN's (what the eager fast path calls) and the kernels' own
(``edt_product`` in ``src/edtir/models/cpu_ffn.c``), 2 threads, GFLOP/s.

    python benchmarks/cpu_products.py                  # EDT-T's four products at 264x264 and EDT-B's at 72x72
    python benchmarks/cpu_products.py --ffn-bands      # oneDNN's FFN (fc1+GELU, dwconv+GELU, fc2) in row bands

A product that keeps its pace on cached rows but loses it on the whole map is bound by memory: the map (EDT-T at
264x264: 17 MB in, up to 50 MB out) does not fit in cache, so fusing the ops of a block so that their
intermediates stay in cache pays. ``--ffn-bands`` is the cheaper try that did not pay: oneDNN's own FFN ops run on
bands of rows (with the depthwise conv's halo) so that each band's maps stay in cache.
"""

from __future__ import annotations

import argparse
import ctypes
import os

import torch
import torch.nn.functional as F
from cpu_attention import median_ms

import edtir.models.edt as E
from edtir.models import cpu_kernel


def median_s(f) -> float:
    """Median seconds of 15 runs after two warm-ups."""
    return median_ms(f, repeats=15, warmup=2) / 1e3


def kernel_product():
    """The kernels' product on torch's threads (``edt_product_threads``) from the built library, or None."""
    if cpu_kernel.library() is None:
        return None
    fn = ctypes.CDLL(str(cpu_kernel._state["path"])).edt_product_threads
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [ptr, ctypes.c_int64, i32, ptr, i32, ptr, ptr, ptr, i32, i32]
    fn.restype = None
    return fn


def products() -> None:
    onednn = torch.ops.mkldnn._linear_pointwise
    mine = kernel_product()
    threads = torch.get_num_threads()
    print("# GFLOP/s, 2 threads, median of 15: the whole map (rows x in -> out) and 30 passes over 2,304 cached rows;")
    print(f"{'product':<26}{'oneDNN map':>12}{'oneDNN cached':>15}{'kernel map':>12}{'kernel cached':>15}")
    for label, rows, k, n in (("EDT-T qkv 264x264", 69696, 60, 180), ("EDT-T proj", 69696, 60, 60),
                              ("EDT-T fc1", 69696, 60, 120), ("EDT-T fc2", 69696, 120, 60),
                              ("EDT-B qkv 72x72", 5184, 180, 540), ("EDT-B fc1", 5184, 180, 360),
                              ("EDT-B fc2", 5184, 360, 180)):
        w, b = torch.randn(n, k), torch.randn(n)
        cells = []
        for m, passes in ((rows, 1), (2304, 30)):
            x, y = torch.randn(m, k), torch.empty(m, n)
            flop = 2.0 * m * k * n * passes
            cells.append(flop / median_s(lambda: [onednn(x, w, b, "none", [], "")  # noqa: B023
                                                  for _ in range(passes)]) / 1e9)  # noqa: B023
            if mine is None:
                cells.append(float("nan"))
                continue
            wp = cpu_kernel.panels(w)

            def run():
                for _ in range(passes):  # noqa: B023
                    mine(x.data_ptr(), m, k, wp.data_ptr(), n, b.data_ptr(), None, y.data_ptr(), 0,  # noqa: B023
                         threads)
            cells.append(flop / median_s(run) / 1e9)
        print(f"{label:<26}{cells[0]:>12.0f}{cells[2]:>15.0f}{cells[1]:>12.0f}{cells[3]:>15.0f}", flush=True)


def ffn_bands() -> None:
    """oneDNN's FFN of an EDT-T block at 264x264, whole and in bands of rows (2-row halo), ms."""
    op, conv = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._convolution_pointwise
    H = W = 264
    C, hidden = 60, 120
    x, res = torch.randn(1, H, W, C), torch.randn(1, H, W, C)
    w1, b1, w2, b2 = torch.randn(hidden, C) * 0.1, torch.randn(hidden), torch.randn(C, hidden) * 0.1, torch.randn(C)
    dw, db = torch.randn(hidden, 1, 5, 5) * 0.1, torch.randn(hidden)

    def whole():
        h = op(x, w1, b1, "gelu", [], "none").permute(0, 3, 1, 2)
        h = conv(h, dw, db, [2, 2], [1, 1], [1, 1], hidden, "gelu", [], "none")
        return op.binary(h.permute(0, 2, 3, 1), res, w2, b2, "add")

    def banded(rows):
        out = torch.empty(1, H, W, C)
        for r0 in range(0, H, rows):
            r1 = min(H, r0 + rows)
            a, b = max(0, r0 - 2), min(H, r1 + 2)
            h = op(x[:, a:b], w1, b1, "gelu", [], "none").permute(0, 3, 1, 2)
            h = F.pad(h, (0, 0, 2 - (r0 - a), 2 - (b - r1)))  # zero rows beyond the map's top and bottom
            h = conv(h, dw, db, [0, 2], [1, 1], [1, 1], hidden, "gelu", [], "none")
            out[:, r0:r1] = op.binary(h.permute(0, 2, 3, 1), res[:, r0:r1], w2, b2, "add")
        return out

    ref = whole()
    print("# oneDNN's FFN of an EDT-T block at 264x264 (fc1+GELU, 5x5 depthwise+GELU, fc2+residual), median ms of 15")
    print(f"whole map: {median_s(whole) * 1e3:.2f} ms")
    for rows in (12, 24, 48, 88):
        diff = (banded(rows) - ref).abs().max().item()
        print(f"bands of {rows} rows: {median_s(lambda: banded(rows)) * 1e3:.2f} ms   max |diff| {diff:.1e}",  # noqa: B023
              flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ffn-bands", action="store_true", help="oneDNN's FFN in row bands instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    E.tune_cpu_allocator()  # as the model's first CPU pass does
    print(f"# CPU, {args.threads} threads; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}; "
          f"C kernels: {cpu_kernel.status()}")
    with torch.inference_mode():
        ffn_bands() if args.ffn_bands else products()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
