"""Fused Triton kernels for EDT inference on CUDA: what a transformer block does between its matrix products.

The eager fast path (``edt.py``) runs a block as about twenty kernels, most of them memory-bound: on an H200 an
EDT-B x2 pass over a 240x360 input spent more time in PyTorch's depthwise-conv kernel, in cuDNN's flash attention
at a sequence of 144 and in the copies around them than in the products (docs/performance.md). Here these kernels
replace that middle:

- :func:`window_attention`: both branches' shifted window attention with LePE, read straight from the qkv
  projection's token map and written straight into the map ``proj`` reads. No gather, no scatter, no mask tensor
  (region labels are computed from the position), no separate LePE convolution.
- :func:`dwconv_gelu`: the FFN's 5x5 depthwise conv, its bias and GELU on the channel-last map, no layout copy.
- :func:`layer_norm`: LayerNorm that writes the dtype the next product wants (bf16 under autocast; PyTorch's
  autocast norm writes fp32, then the product casts it again).
- :func:`linear`: a matrix product with its epilogue (fc1's GELU; fc2's bias and the residual add), and
  :func:`norm_linear`, the norm inside the product; :data:`PRODUCTS` says which of a block's products use them.
  fp32 products run as three TF32 products on tensor cores (:data:`FP32_PRODUCTS`).

Used by :meth:`edt.EDTBlock.forward` for inference on CUDA when Triton is importable (``EDTIR_TRITON=0`` turns it
off). Tests run them on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, see ``interpreting``) and on a
GPU against the reference path.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .switch import Switch

# Triton 3.9 warns that its default for fusing multiply-adds will change; the kernels were timed with fusion on
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
try:  # an optional dependency: CUDA builds of torch ship it; the CPU tests install it for the interpreter
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - not installed, or an install that does not import: the PyTorch path
    triton = None

#: EDTIR_TRITON=0 in the environment (or ``with kernels.enabled(False)``) keeps the eager fast path on CUDA too.
enabled = Switch("EDTIR_TRITON")


#: devices on which a kernel failed (a GPU or Triton version they do not compile for): PyTorch's path there
_failed: set[str] = set()


def available() -> bool:
    return triton is not None and enabled.on


def disable(device: torch.device, error: Exception) -> None:
    """Stop using the kernels on ``device`` after ``error``, with one warning: the model goes on with PyTorch's
    kernels rather than failing the user's run."""
    _failed.add(str(device))
    warnings.warn(f"edtir: the fused Triton kernels failed on {device} ({type(error).__name__}: "
                  f"{str(error).splitlines()[0][:200] if str(error) else ''}); using PyTorch's kernels there",
                  RuntimeWarning, stacklevel=3)


def interpreting() -> bool:
    """Triton's interpreter runs the kernels on CPU tensors (slowly): for tests only, never chosen by default."""
    return triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def serves(x: torch.Tensor) -> bool:
    """Whether the fused kernels run for this input: CUDA (or the interpreter on the CPU), inference (no_grad or
    inference_mode: they have no backward)."""
    return (available() and (x.is_cuda or (x.device.type == "cpu" and interpreting()))
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and not torch.is_grad_enabled()
            and str(x.device) not in _failed)


def head_pad(head_dim: int) -> int:
    """q, k and v head dims the attention kernel reads: a multiple of 16 (the smallest matrix-product tile)."""
    return -(-head_dim // 16) * 16


def out_dtype(x: torch.Tensor) -> torch.dtype:
    """What a product under the current autocast would read: the autocast dtype, else ``x``'s."""
    dev = "cuda" if x.is_cuda else "cpu"
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


if triton is not None:

    @triton.jit
    def _gelu(v):
        """Exact GELU, as F.gelu."""
        return 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))

    @triton.jit
    def _add_norm_rows(x_ptr, y_ptr, sum_ptr, w_ptr, b_ptr, r, c, M, eps, C: tl.constexpr, YS: tl.constexpr,
                       HAS_Y: tl.constexpr):
        """Rows r of x (width C), plus rows of y (row stride YS) if HAS_Y with the sum stored to sum_ptr, layer-normed
        (fp32 statistics): fp32, zeros in the columns c >= C."""
        ok_c = c < C
        ok = (r < M)[:, None] & ok_c[None, :]
        x = tl.load(x_ptr + r[:, None] * C + c[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_Y:
            x += tl.load(y_ptr + r[:, None] * YS + c[None, :], mask=ok, other=0.0).to(tl.float32)
            tl.store(sum_ptr + r[:, None] * C + c[None, :], x.to(sum_ptr.dtype.element_ty), mask=ok)
        mean = tl.sum(x, 1) / C
        d = tl.where(ok, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / C + eps)
        return d * rstd[:, None] * tl.load(w_ptr + c, mask=ok_c, other=0.0)[None, :] \
            + tl.load(b_ptr + c, mask=ok_c, other=0.0)[None, :]

    @triton.jit
    def _positions(t, A: tl.constexpr, B: tl.constexpr, wr, wc, s_r, s_c, H, W, pix0, SHIFTED: tl.constexpr):
        """Token t (row-major in an A x B window at grid cell (wr, wc) of the map rolled by -(s_r, s_c)) ->
        (its pixel row in the token map, its shift-region label). A and B are constants, so t // B is cheap, and
        the roll wraps by one subtraction (i + s < 2 H), not a division."""
        i = wr * A + t // B
        j = wc * B + t % B
        if SHIFTED:
            si = tl.where(i + s_r >= H, i + s_r - H, i + s_r)
            sj = tl.where(j + s_c >= W, j + s_c - W, j + s_c)
            label = ((i >= H - A).to(tl.int32) + (i >= H - s_r).to(tl.int32)) * 3 \
                + (j >= W - B).to(tl.int32) + (j >= W - s_c).to(tl.int32)
        else:
            si = i
            sj = j
            label = i * 0
        return pix0 + si.to(tl.int64) * W + sj, label

    @triton.jit
    def _attend(qkv_ptr, out_ptr, lw_ptr, lb_ptr, H, W, w, pix0, h, m0, s_r, s_c, BR: tl.constexpr,
                A: tl.constexpr, B: tl.constexpr, HEADS: tl.constexpr, D: tl.constexpr,
                SHIFTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
                F32_PREC: tl.constexpr):
        """Query tokens [m0, m0 + BLOCK_M) of head h in window w of branch BR, whose windows are A x B."""
        N: tl.constexpr = A * B
        TW: tl.constexpr = 6 * HEADS * D  # qkv row: [branch][q, k, v][head][D]
        ncol = W // B
        wr = w // ncol
        wc = w % ncol
        col = tl.arange(0, D)
        base = BR * 3 * HEADS * D + h * D
        t_q = m0 + tl.arange(0, BLOCK_M)
        ok_q = t_q < N
        pos_q, lab_q = _positions(t_q, A, B, wr, wc, s_r, s_c, H, W, pix0, SHIFTED)
        q = tl.load(qkv_ptr + pos_q[:, None] * TW + base + col[None, :], mask=ok_q[:, None], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            t_k = n0 + tl.arange(0, BLOCK_N)
            ok_k = t_k < N
            pos_k, lab_k = _positions(t_k, A, B, wr, wc, s_r, s_c, H, W, pix0, SHIFTED)
            kv = qkv_ptr + pos_k[:, None] * TW + base + col[None, :]
            k = tl.load(kv + HEADS * D, mask=ok_k[:, None], other=0.0)
            v = tl.load(kv + 2 * HEADS * D, mask=ok_k[:, None], other=0.0)
            if DOT_F32:
                s = tl.dot(q, tl.trans(k), input_precision=F32_PREC)
            else:
                s = tl.dot(q, tl.trans(k))
            if SHIFTED:  # Swin's mask: -100 between tokens the cyclic shift brought together from two regions
                s = s + tl.where(lab_q[:, None] != lab_k[None, :], -100.0, 0.0)
            if N % BLOCK_N != 0:
                s = tl.where(ok_k[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DOT_F32:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=F32_PREC)
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]

        # LePE: a 3x3 depthwise conv on v inside the window (zeros beyond its border), in the branch's own frame.
        # Its weights come padded like v ((2 * HEADS * D, 9), zeros in the padding), so no load is masked by column;
        # the taps are a loop, not unrolled (unrolled, their loads in flight doubled the registers)
        vp = qkv_ptr + base + 2 * HEADS * D + col[None, :]
        lw = lw_ptr + (BR * HEADS * D + h * D + col) * 9
        out += tl.load(lb_ptr + BR * HEADS * D + h * D + col)[None, :]
        ti = t_q // B
        tj = t_q % B
        for di in range(3):
            for dj in range(3):
                ni = ti + (di - 1)
                nj = tj + (dj - 1)
                inside = ok_q & (ni >= 0) & (ni < A) & (nj >= 0) & (nj < B)
                pos_n, _ = _positions(tl.where(inside, ni * B + nj, 0), A, B, wr, wc, s_r, s_c, H, W, pix0, SHIFTED)
                vn = tl.load(vp + pos_n[:, None] * TW, mask=inside[:, None], other=0.0)
                out += vn.to(tl.float32) * tl.load(lw + di * 3 + dj)[None, :]
        # written padded like v, (pixel, branch, head, D): whole aligned rows, zeros in the padding
        tl.store(out_ptr + pos_q[:, None] * (2 * HEADS * D) + BR * HEADS * D + h * D + col[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=ok_q[:, None])

    # sizes are not specialised on (Triton would compile again for every new divisibility of H and W)
    @triton.jit(do_not_specialize=["H", "W", "s_h0", "s_h1"])
    def _window_attention_kernel(
            qkv_ptr, out_ptr, lw_ptr, lb_ptr, H, W, s_h0, s_h1,
            HEADS: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
            SHIFTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
            F32_PREC: tl.constexpr):
        # one program: BLOCK_M query tokens of one (image, window, branch, head); the horizontal branch's windows
        # are WH x WW and shifted by (s_h0, s_h1), the vertical branch's are the transposes
        nwin = (H // WH) * (W // WW)  # windows per image: the same for both branches
        img = tl.program_id(0) // nwin
        w = tl.program_id(0) % nwin
        pix0 = img.to(tl.int64) * H * W
        h = tl.program_id(1) % HEADS
        m0 = tl.program_id(2) * BLOCK_M
        if tl.program_id(1) < HEADS:
            _attend(qkv_ptr, out_ptr, lw_ptr, lb_ptr, H, W, w, pix0, h, m0, s_h0, s_h1, 0, WH, WW, HEADS, D,
                    SHIFTED, BLOCK_M, BLOCK_N, DOT_F32, F32_PREC)
        else:
            _attend(qkv_ptr, out_ptr, lw_ptr, lb_ptr, H, W, w, pix0, h, m0, s_h1, s_h0, 1, WW, WH, HEADS, D,
                    SHIFTED, BLOCK_M, BLOCK_N, DOT_F32, F32_PREC)

    @triton.jit(do_not_specialize=["H", "W"])
    def _dwconv_gelu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, H, W, CH: tl.constexpr,
                            K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        # one program: BLOCK_W pixels of one row x BLOCK_C channels of a channel-last (B, H, W, CH) map. CH is a
        # constant (the model's hidden width), so rows are known to be aligned and loads go 16 bytes at a time;
        # row pointers are 64-bit scalars, offsets within a row 32-bit
        row = tl.program_id(0)  # image * H + y
        y = row % H
        x = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok_c = c < CH
        acc = tl.zeros([BLOCK_W, BLOCK_C], tl.float32) + tl.load(b_ptr + c, mask=ok_c, other=0.0)[None, :]
        for ky in range(K):  # loops, not unrolled: 25 tiles of loads in flight at once spill registers
            yy = y + ky - K // 2
            src = x_ptr + (row + ky - K // 2).to(tl.int64) * W * CH
            for kx in range(K):
                xx = x + kx - K // 2
                yv = yy + tl.zeros_like(xx)  # a vector: Triton 3.9's interpreter rejects scalar & vector masks
                ok = (yv >= 0) & (yv < H) & (xx >= 0) & (xx < W)
                v = tl.load(src + xx[:, None] * CH + c[None, :], mask=ok[:, None] & ok_c[None, :], other=0.0)
                acc += v.to(tl.float32) * tl.load(w_ptr + c * (K * K) + ky * K + kx, mask=ok_c, other=0.0)[None, :]
        acc = _gelu(acc)
        dst = out_ptr + row.to(tl.int64) * W * CH
        tl.store(dst + x[:, None] * CH + c[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(x < W)[:, None] & ok_c[None, :])

    @triton.jit(do_not_specialize=["H", "W"])
    def _dwconv_gelu_rows_kernel(x_ptr, w_ptr, b_ptr, out_ptr, H, W, CH: tl.constexpr, K: tl.constexpr,
                                 ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        # as _dwconv_gelu_kernel, for ROWS (2 or 4) output rows at once: each of the ROWS + K - 1 input rows is read
        # once per horizontal tap and feeds every output row it reaches, (ROWS + K - 1) * K loads instead of
        # ROWS * K * K. Input rows are unrolled (which output rows a row reaches is known at compile time), the
        # horizontal taps are a loop
        nrb = tl.cdiv(H, ROWS)
        img = tl.program_id(0) // nrb
        y0 = (tl.program_id(0) % nrb) * ROWS
        x = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok_c = c < CH
        bias = tl.load(b_ptr + c, mask=ok_c, other=0.0)[None, :]
        acc0 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32) + bias
        acc1 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32) + bias
        acc2 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32) + bias
        acc3 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32) + bias
        image = x_ptr + img.to(tl.int64) * H * W * CH
        wc = w_ptr + c  # weights (K * K, CH): a tap's weights are contiguous over channels (16-byte loads)
        for i in tl.static_range(ROWS + K - 1):
            yy = y0 + i - K // 2
            src = image + yy.to(tl.int64) * W * CH
            yv = yy + tl.zeros_like(x)
            for kx in range(K):
                xx = x + kx - K // 2
                ok = (yv >= 0) & (yv < H) & (xx >= 0) & (xx < W)
                v = tl.load(src + xx[:, None] * CH + c[None, :], mask=ok[:, None] & ok_c[None, :],
                            other=0.0).to(tl.float32)
                if i < K:  # output row y0 reads this row through tap row i
                    acc0 += v * tl.load(wc + (i * K + kx) * CH, mask=ok_c, other=0.0)[None, :]
                if i >= 1 and i < K + 1:
                    acc1 += v * tl.load(wc + ((i - 1) * K + kx) * CH, mask=ok_c, other=0.0)[None, :]
                if ROWS > 2:
                    if i >= 2 and i < K + 2:
                        acc2 += v * tl.load(wc + ((i - 2) * K + kx) * CH, mask=ok_c, other=0.0)[None, :]
                    if i >= 3 and i < K + 3:
                        acc3 += v * tl.load(wc + ((i - 3) * K + kx) * CH, mask=ok_c, other=0.0)[None, :]
        ok_x = (x < W)[:, None] & ok_c[None, :]
        y_out = y0 + tl.zeros_like(x)  # a vector: the interpreter rejects scalar & vector masks
        dst = out_ptr + (img.to(tl.int64) * H + y0) * W * CH + x[:, None] * CH + c[None, :]
        tl.store(dst, _gelu(acc0).to(out_ptr.dtype.element_ty), mask=ok_x)
        tl.store(dst + W * CH, _gelu(acc1).to(out_ptr.dtype.element_ty), mask=ok_x & (y_out + 1 < H)[:, None])
        if ROWS > 2:
            tl.store(dst + 2 * W * CH, _gelu(acc2).to(out_ptr.dtype.element_ty), mask=ok_x & (y_out + 2 < H)[:, None])
            tl.store(dst + 3 * W * CH, _gelu(acc3).to(out_ptr.dtype.element_ty), mask=ok_x & (y_out + 3 < H)[:, None])

    @triton.jit(do_not_specialize=["M"])
    def _linear_kernel(a_ptr, w_ptr, b_ptr, r_ptr, out_ptr, M, K: tl.constexpr, N: tl.constexpr, LDW: tl.constexpr,
                       GELU: tl.constexpr, RESIDUAL: tl.constexpr, DOT_F32: tl.constexpr, F32_PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # one program: a BLOCK_M x BLOCK_N tile of a (M, K) @ w (K, N; row stride LDW) + bias, then GELU or the
        # residual (M, N) added in registers. Programs of one row band run one after another (n fastest), so the
        # band of a is read from memory once and from L2 after
        NUM_N: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        EVEN_K: tl.constexpr = K % BLOCK_K == 0
        pid = tl.program_id(0)
        rm = (pid // NUM_N).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (pid % NUM_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        ok_m = rm < M
        ok_n = rn < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            ok_k = kk < K
            if EVEN_K:
                a = tl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=ok_m[:, None], other=0.0)
                w = tl.load(w_ptr + kk[:, None] * LDW + rn[None, :], mask=ok_n[None, :], other=0.0)
            else:
                a = tl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=ok_m[:, None] & ok_k[None, :], other=0.0)
                w = tl.load(w_ptr + kk[:, None] * LDW + rn[None, :], mask=ok_k[:, None] & ok_n[None, :], other=0.0)
            if DOT_F32:
                acc = tl.dot(a, w, acc, input_precision=F32_PREC)
            else:
                acc = tl.dot(a, w, acc)
        acc += tl.load(b_ptr + rn, mask=ok_n, other=0.0)[None, :]
        if GELU:
            acc = _gelu(acc)
        ok = ok_m[:, None] & ok_n[None, :]
        if RESIDUAL:
            acc += tl.load(r_ptr + rm[:, None] * N + rn[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["M"])
    def _norm_linear_kernel(x_ptr, y_ptr, sum_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, out_ptr, M, eps, C: tl.constexpr,
                            YS: tl.constexpr, N: tl.constexpr, LDW: tl.constexpr, HAS_Y: tl.constexpr,
                            GELU: tl.constexpr, DOT_F32: tl.constexpr, F32_PREC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        # one program: BLOCK_M rows of x (+ y, row stride YS, the sum stored), layer-normed in registers (fp32
        # statistics), then multiplied by w (C, N; row stride LDW) BLOCK_N columns at a time, + bias (+ GELU):
        # the norm's output never goes to memory, and each row is read once for all N columns
        r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.arange(0, BLOCK_C)
        ok_r = r < M
        ok_c = c < C
        a = _add_norm_rows(x_ptr, y_ptr, sum_ptr, nw_ptr, nb_ptr, r, c, M, eps, C, YS, HAS_Y)
        a = a.to(w_ptr.dtype.element_ty)  # the padded columns are zero: w's rows there are read as zeros too
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            ok_n = rn < N
            w = tl.load(w_ptr + c[:, None] * LDW + rn[None, :], mask=ok_c[:, None] & ok_n[None, :], other=0.0)
            if DOT_F32:
                acc = tl.dot(a, w, input_precision=F32_PREC)
            else:
                acc = tl.dot(a, w)
            acc += tl.load(b_ptr + rn, mask=ok_n, other=0.0)[None, :]
            if GELU:
                acc = _gelu(acc)
            tl.store(out_ptr + r[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=ok_r[:, None] & ok_n[None, :])

    @triton.jit(do_not_specialize=["M"])
    def _layer_norm_kernel(x_ptr, y_ptr, sum_ptr, w_ptr, b_ptr, out_ptr, M, eps, C: tl.constexpr, YS: tl.constexpr,
                           CP: tl.constexpr, HAS_Y: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # rows of x (width C), plus rows of y (row stride YS) if HAS_Y, the sum stored to sum_ptr; the norm is
        # written CP wide, zeros beyond C
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        y = _add_norm_rows(x_ptr, y_ptr, sum_ptr, w_ptr, b_ptr, r, c, M, eps, C, YS, HAS_Y)
        tl.store(out_ptr + r[:, None] * CP + c[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=(r < M)[:, None] & (c < CP)[None, :])


def _tiles(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """Tile sizes and warps from the environment (``benchmarks/triton_kernels.py --env`` writes them), else
    ``default`` (as many powers of two as it has)."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        tiles = tuple(int(v) for v in raw.split(","))
    except ValueError:
        tiles = ()
    if len(tiles) != len(default) or any(v <= 0 or v & (v - 1) for v in tiles):
        raise UsageError(f"{name}={raw!r}: expected {len(default)} powers of two, e.g. "
                         f"{','.join(map(str, default))}")
    return tiles


#: query tokens, key tokens per step, warps per program of the attention kernel (EDTIR_ATTENTION_BLOCKS);
#: benchmarks/triton_kernels.py times the choices
ATTENTION_BLOCKS = _tiles("EDTIR_ATTENTION_BLOCKS", (32, 16, 2))


def window_attention(qkv: torch.Tensor, shape, window: tuple[int, int], shift: tuple[int, int], heads: int,
                     head_dim: int, lepe_weight: torch.Tensor, lepe_bias: torch.Tensor,
                     blocks: tuple[int, ...] | None = None, fp32_products: str | None = None) -> torch.Tensor:
    """Both branches of an EDT block's attention, LePE added: (B, H, W, 2 * 3 * heads * D) qkv in the layout of
    :meth:`edt.EDTBlock.qkv_weight` (q pre-scaled, head dims zero-padded to D = :func:`head_pad`) ->
    (B, H, W, 2 * heads * D), [horizontal | vertical] per pixel, each head padded to D with zeros (aligned rows
    store fast; ``proj`` reads it with zero columns in its weight, :func:`unpad` drops them).

    ``window`` is the horizontal branch's (the vertical one is its transpose), ``shift`` its roll ((0, 0) for an
    unshifted block); ``lepe_weight`` (2 * heads * head_dim, 9) holds both branches' 3x3 kernels, each in its own
    window's frame (or already padded by :func:`pad_lepe`). ``fp32_products``: see :data:`FP32_PRODUCTS`."""
    B, H, W = shape
    D = head_pad(head_dim)
    wh, ww = window
    if qkv.shape[-1] != 6 * heads * D or H % wh or W % ww or H % ww or W % wh:
        raise ValueError(f"window_attention: qkv {tuple(qkv.shape)} or map {H}x{W} does not fit window {window}")
    qkv = qkv.contiguous()
    out = qkv.new_empty(B, H, W, 2 * heads * D)
    bm, bn, warps = (tuple(blocks or ATTENTION_BLOCKS) + (4,))[:3]
    n = wh * ww
    if lepe_weight.shape[0] != 2 * heads * D:
        lepe_weight, lepe_bias = pad_lepe(lepe_weight, lepe_bias, heads, head_dim)
    grid = (B * (H // wh) * (W // ww), 2 * heads, triton.cdiv(n, bm))
    _window_attention_kernel[grid](
        qkv, out, lepe_weight, lepe_bias, H, W, shift[0], shift[1],
        HEADS=heads, D=D, WH=wh, WW=ww, SHIFTED=bool(shift[0] or shift[1]),
        BLOCK_M=bm, BLOCK_N=bn, DOT_F32=qkv.dtype == torch.float32, F32_PREC=fp32_products or FP32_PRODUCTS,
        num_warps=warps)
    return out


def _fp32_products() -> str:
    value = os.environ.get("EDTIR_FP32_PRODUCTS", "tf32x3")
    if value not in ("ieee", "tf32x3"):
        raise UsageError(f"EDTIR_FP32_PRODUCTS={value!r}: expected ieee or tf32x3")
    return value


#: how the kernels multiply fp32 inputs (EDTIR_FP32_PRODUCTS): "tf32x3" (three TF32 products that make up an fp32
#: one, on tensor cores: EDT-B 240x360 on an H200 84 ms instead of 118, output within 2e-7 of the reference like
#: "ieee"; docs/performance.md) or "ieee" (full precision on the FMA units)
FP32_PRODUCTS = _fp32_products()


#: pixels, channels, warps per program of the depthwise conv kernel (EDTIR_DWCONV_BLOCKS)
DWCONV_BLOCKS = _tiles("EDTIR_DWCONV_BLOCKS", (16, 128, 4))


def _dwconv_rows() -> int:
    value = os.environ.get("EDTIR_DWCONV_ROWS", "2")
    if value not in ("1", "2", "4"):
        raise UsageError(f"EDTIR_DWCONV_ROWS={value!r}: expected 1, 2 or 4")
    return int(value)


#: output rows per program of the depthwise conv (EDTIR_DWCONV_ROWS): 2 or 4 share each input row's loads; 2 was
#: the fastest on an H200 (EDT-B's FFN conv at 240x360, bf16: 0.183 ms against 0.200 for 1 and 0.204-0.288 for 4)
DWCONV_ROWS = _dwconv_rows()


#: rows, columns, depth, warps per program of the product kernel, bf16/fp16 (EDTIR_LINEAR_BLOCKS) and fp32
#: (EDTIR_LINEAR_BLOCKS_FP32): the fastest of benchmarks/triton_kernels.py's sweep on an H200 (tiles that spill
#: registers for sm_90, benchmarks/triton_compile_check.py, are not swept)
LINEAR_BLOCKS = _tiles("EDTIR_LINEAR_BLOCKS", (128, 64, 32, 4))
LINEAR_BLOCKS_FP32 = _tiles("EDTIR_LINEAR_BLOCKS_FP32", (128, 64, 32, 8))


def _products() -> str:
    value = os.environ.get("EDTIR_TRITON_PRODUCTS", "auto")
    if value not in ("auto", "none", "ffn", "all", "norms"):
        raise UsageError(f"EDTIR_TRITON_PRODUCTS={value!r}: expected auto, none, ffn, all or norms")
    return value


#: which of a block's products :func:`linear` runs instead of cuBLAS (EDTIR_TRITON_PRODUCTS): "ffn" (fc1 with its
#: GELU, fc2 with its bias and the residual add: one kernel each instead of a product and an elementwise pass),
#: "all" (qkv and proj too), "norms" (all four, and the two layer norms inside qkv's and fc1's kernels:
#: :func:`norm_linear`), "none"; "auto": see :func:`products_in_triton`
PRODUCTS = _products()


def products_in_triton(dtype: torch.dtype) -> str:
    """Which products go through :func:`linear` for inputs of ``dtype``: the FFN's in bf16/fp16 (their epilogues
    save whole passes over the hidden map); in fp32 all four when the products run as three TF32 products on
    tensor cores (cuBLAS's fp32 products have no tensor cores with TF32 off), none with full-precision products."""
    if PRODUCTS != "auto":
        return "" if PRODUCTS == "none" else PRODUCTS
    if dtype == torch.float32:
        return "all" if FP32_PRODUCTS == "tf32x3" else ""
    return "ffn"


@contextlib.contextmanager
def settings(products: str | None = None, fp32_products: str | None = None, dwconv_rows: int | None = None):
    """:data:`PRODUCTS`, :data:`FP32_PRODUCTS` and :data:`DWCONV_ROWS` set for a block (benchmarks compare them in
    one process); None keeps a setting."""
    global PRODUCTS, FP32_PRODUCTS, DWCONV_ROWS
    old = PRODUCTS, FP32_PRODUCTS, DWCONV_ROWS
    PRODUCTS, FP32_PRODUCTS = products or PRODUCTS, fp32_products or FP32_PRODUCTS
    DWCONV_ROWS = dwconv_rows or DWCONV_ROWS
    try:
        yield
    finally:
        PRODUCTS, FP32_PRODUCTS, DWCONV_ROWS = old


def linear(a: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor, n: int, gelu: bool = False,
           residual: torch.Tensor | None = None, blocks: tuple[int, ...] | None = None,
           fp32_products: str | None = None) -> torch.Tensor:
    """``gelu?(a @ wt[:, :n] + bias[:n]) (+ residual)`` over the last dim of ``a`` in one kernel: ``wt`` is the
    weight transposed, (K, >= n) (see :func:`product_weights`), ``bias`` fp32. The output has ``a``'s dtype, or the
    residual's (the fp32 stream under autocast) when there is one; accumulation in fp32."""
    K = a.shape[-1]
    if wt.shape[0] != K or wt.shape[1] < n or wt.stride(1) != 1 or bias.shape[0] < n:
        raise ValueError(f"linear: input width {K}, weight {tuple(wt.shape)}, bias {tuple(bias.shape)}, n {n}")
    a2 = a.reshape(-1, K).contiguous()
    M = a2.shape[0]
    out = torch.empty(*a.shape[:-1], n, dtype=residual.dtype if residual is not None else a.dtype, device=a.device)
    if residual is not None:
        if residual.shape != out.shape:
            raise ValueError(f"linear: residual {tuple(residual.shape)} for an output {tuple(out.shape)}")
        residual = residual.contiguous()
    bm, bn, bk, warps = tuple(blocks or (LINEAR_BLOCKS_FP32 if a.dtype == torch.float32 else LINEAR_BLOCKS))
    grid = (triton.cdiv(M, bm) * triton.cdiv(n, bn),)
    _linear_kernel[grid](a2, wt, bias, residual if residual is not None else out, out, M, K=K, N=n,
                         LDW=wt.stride(0), GELU=gelu, RESIDUAL=residual is not None,
                         DOT_F32=a2.dtype == torch.float32, F32_PREC=fp32_products or FP32_PRODUCTS,
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=3)
    return out


#: rows, columns per step, warps per program of the norm-and-product kernel, bf16/fp16
#: (EDTIR_NORM_LINEAR_BLOCKS) and fp32 (EDTIR_NORM_LINEAR_BLOCKS_FP32); chosen as :data:`LINEAR_BLOCKS`
NORM_LINEAR_BLOCKS = _tiles("EDTIR_NORM_LINEAR_BLOCKS", (64, 64, 8))
NORM_LINEAR_BLOCKS_FP32 = _tiles("EDTIR_NORM_LINEAR_BLOCKS_FP32", (16, 64, 8))


def _add_operand(x: torch.Tensor, add: torch.Tensor | None):
    """What the norm kernels read for ``x + add``: (add's rows, their stride, the sum's output), else x's own
    (HAS_Y off). ``add`` may be a column slice of a wider tensor: its rows stay a view where they can."""
    if add is None:
        return x, x.shape[-1], x
    y = add.flatten(0, -2)
    if y.stride(-1) != 1:
        y = y.contiguous()
    return y, y.stride(0), torch.empty_like(x, dtype=torch.promote_types(x.dtype, add.dtype))


def norm_linear(x: torch.Tensor, norm: torch.nn.LayerNorm, wt: torch.Tensor, bias: torch.Tensor, n: int,
                gelu: bool = False, add: torch.Tensor | None = None, blocks: tuple[int, ...] | None = None,
                fp32_products: str | None = None):
    """``gelu?(norm(x) @ wt[:norm width, :n] + bias[:n])`` in one kernel: :func:`layer_norm` and :func:`linear`
    without the norm's output in memory. ``wt`` (>= C, >= n) as :func:`product_weights` lays it out; the output has
    ``wt``'s dtype. With ``add``: the norm of ``x + add`` (``add`` may be a column slice), returned as
    ``(sum, out)`` like :func:`layer_norm`."""
    C = x.shape[-1]
    if wt.shape[0] < C or wt.shape[1] < n or wt.stride(1) != 1 or bias.shape[0] < n:
        raise ValueError(f"norm_linear: input width {C}, weight {tuple(wt.shape)}, bias {tuple(bias.shape)}, n {n}")
    x = x.contiguous()
    M = x.numel() // C
    out = torch.empty(*x.shape[:-1], n, dtype=wt.dtype, device=x.device)
    y, ys, total = _add_operand(x, add)
    bm, bn, warps = tuple(blocks or (NORM_LINEAR_BLOCKS_FP32 if wt.dtype == torch.float32 else NORM_LINEAR_BLOCKS))
    _norm_linear_kernel[(triton.cdiv(M, bm),)](
        x, y, total, norm.weight.float().contiguous(), norm.bias.float().contiguous(), wt, bias, out, M, norm.eps,
        C=C, YS=ys, N=n, LDW=wt.stride(0), HAS_Y=add is not None, GELU=gelu, DOT_F32=wt.dtype == torch.float32,
        F32_PREC=fp32_products or FP32_PRODUCTS, BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=triton.next_power_of_2(C),
        num_warps=warps)
    return (total, out) if add is not None else out


def product_weights(*pairs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(weight, bias) pairs as :func:`linear` reads them: each weight transposed, contiguous; each bias fp32."""
    return tuple(t for w, b in pairs for t in (w.t().contiguous(), b.float().contiguous()))


def pad_lepe(weight: torch.Tensor, bias: torch.Tensor, heads: int, head_dim: int):
    """LePE's (2 * heads * head_dim, 9) kernels and biases, fp32, padded per head like v (zeros)."""
    pad = (0, 0, 0, head_pad(head_dim) - head_dim)  # (2 * heads, head_dim, 9) -> (2 * heads, D, 9)
    return (F.pad(weight.float().reshape(2 * heads, head_dim, 9), pad).reshape(-1, 9).contiguous(),
            F.pad(bias.float().reshape(2 * heads, head_dim), pad[2:]).reshape(-1).contiguous())


def unpad(out: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """:func:`window_attention`'s output without its padding: (..., 2 * heads * head_dim)."""
    return out.unflatten(-1, (2 * heads, -1))[..., :head_dim].flatten(-2)


def pad_columns(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """A (out, 2 * heads * head_dim) weight read against :func:`window_attention`'s padded output: zero columns
    where the output has padding."""
    D = head_pad(head_dim)
    return F.pad(weight.unflatten(1, (2 * heads, head_dim)), (0, D - head_dim)).flatten(1)


def dwconv_weights(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A depthwise conv's (C, 1, k, k) weights and its bias as :func:`dwconv_gelu`'s kernels read them, fp32: taps
    per channel (C, k * k) for the one-row kernel, channels per tap (k * k, C) for the multi-row one, the bias. Kept
    with the block's other fused weights, so that a pass lays nothing out anew."""
    taps = weight.float().reshape(weight.shape[0], -1).contiguous()
    return taps, taps.t().contiguous(), bias.float().contiguous()


def dwconv_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                blocks: tuple[int, ...] | None = None, rows: int | None = None,
                laid: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """GELU(depthwise conv(x) + bias), 'same' zero padding, on a channel-last (B, H, W, C) map; ``weight`` is the
    conv's (C, 1, k, k). The accumulation is fp32 whatever x's dtype. ``rows``: output rows per program (1, 2
    or 4; default :data:`DWCONV_ROWS`). ``laid``: :func:`dwconv_weights` of the same weight and bias, made once."""
    B, H, W, C = x.shape
    k = weight.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    bw, bc, warps = (tuple(blocks or DWCONV_BLOCKS) + (4,))[:3]
    rows = rows or DWCONV_ROWS
    taps, per_tap, b = laid or dwconv_weights(weight, bias)
    if rows == 1:
        grid = (B * H, triton.cdiv(W, bw), triton.cdiv(C, bc))
        _dwconv_gelu_kernel[grid](x, taps, b, out, H, W, C, K=k, BLOCK_W=bw, BLOCK_C=bc, num_warps=warps)
    elif rows in (2, 4):
        grid = (B * triton.cdiv(H, rows), triton.cdiv(W, bw), triton.cdiv(C, bc))
        _dwconv_gelu_rows_kernel[grid](x, per_tap, b, out, H, W, C, K=k, ROWS=rows, BLOCK_W=bw,
                                       BLOCK_C=bc, num_warps=warps)
    else:
        raise ValueError(f"dwconv_gelu: rows={rows}; expected 1, 2 or 4")
    return out


def width_pad(channels: int) -> int:
    """Width the norms write for the products after them: a multiple of 16, so each row is 32-byte aligned in bf16.
    At EDT-B's 180, cuBLAS picked an sm80 kernel for K = 180 and a Hopper one for K = 192 (H200)."""
    return -(-channels // 16) * 16


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm, dtype: torch.dtype | None = None,
               add: torch.Tensor | None = None, width: int | None = None):
    """``norm(x)`` over the last dim, in ``dtype`` (default: :func:`out_dtype`), statistics in fp32, written
    ``width`` wide (zero columns beyond x's; default x's width). With ``add``: the norm of ``x + add`` (``add`` may
    be a column slice of a wider tensor), returned with the sum as ``(sum, norm)`` from one pass."""
    C = x.shape[-1]
    CP = width or C
    x = x.contiguous()
    M = x.numel() // C
    out = torch.empty(*x.shape[:-1], CP, dtype=dtype or out_dtype(x), device=x.device)
    bc = triton.next_power_of_2(CP)
    br = max(1, 2048 // bc)
    y, ys, total = _add_operand(x, add)
    _layer_norm_kernel[(triton.cdiv(M, br),)](
        x, y, total, norm.weight.float().contiguous(), norm.bias.float().contiguous(), out, M, norm.eps,
        C=C, YS=ys, CP=CP, HAS_Y=add is not None, BLOCK_R=br, BLOCK_C=bc, num_warps=4)
    return (total, out) if add is not None else out


def lepe_weights(block) -> tuple[torch.Tensor, torch.Tensor]:
    """Both branches' LePE kernels as (2 * half, 9) and biases (2 * half,), each in its own window's frame."""
    a, b = block.attns
    return (torch.cat([a.lepe.weight, b.lepe.weight]).flatten(1), torch.cat([a.lepe.bias, b.lepe.bias]))


def reference_window_attention(qkv, shape, window, shift, heads, head_dim, lepe_weight, lepe_bias,
                               pad: int | None = None):
    """What :func:`window_attention` computes (unpadded), through the model's reference formulation: each branch's
    :class:`edt.LePEAttention` on the rolled map, with the shift mask of :func:`edt.shift_mask`; ``qkv``'s heads
    padded to ``pad`` (default :func:`head_pad`). For tests, and the check of :mod:`cpu_kernel`."""
    from .edt import LePEAttention, shift_mask

    B, H, W = shape
    half = heads * head_dim
    t = qkv.float().view(B, H, W, 2, 3, heads, pad or head_pad(head_dim))[..., :head_dim].reshape(B, H, W, 2, 3, half)
    outs = []
    for br, win, s in ((0, tuple(window), tuple(shift)), (1, tuple(window[::-1]), tuple(shift[::-1]))):
        attn = LePEAttention(half, heads, win).to(qkv.device)
        attn.scale = 1.0  # q comes scaled
        with torch.no_grad():
            attn.lepe.weight.copy_(lepe_weight[br * half:(br + 1) * half].reshape(half, 1, 3, 3))
            attn.lepe.bias.copy_(lepe_bias[br * half:(br + 1) * half])
            part, shifted = t[:, :, :, br], bool(s[0] or s[1])
            if shifted:
                part = torch.roll(part, shifts=(-s[0], -s[1]), dims=(1, 2))
            out = attn(part, shift_mask(H, W, win, s, qkv.device) if shifted else None)
            outs.append(torch.roll(out, shifts=s, dims=(1, 2)) if shifted else out)
    return torch.cat(outs, -1)
