"""EDT: the Encoder-Decoder Transformer of Li et al., "On Efficient Transformer and Image Pre-training for
Low-level Vision" (arXiv 2112.10175), in reading order.

    image ─ head (convs, per task) ─ body (shared transformer) ─ tail (convs + upsampler, per task) ─ image

Shapes at the boundaries: images are (B, 3, H, W) in [0, 1]; the body sees (B, C, h, w) feature maps and works on
tokens laid out channel-last as (B, h, w, C). Parameter names and their order equal the official release, so an
official checkpoint loads with ``load_state_dict`` (see ``checkpoint.py`` for the shift-mask buffers it carries).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernel, kernels
from .switch import Switch

# ---------------------------------------------------------------------------------------------------------------
# Tasks and sizes
# ---------------------------------------------------------------------------------------------------------------

#: edtir task name -> official key suffix. The order is the official order of heads and tails in a state dict.
TASK_KEYS = {
    "sr-x2": "sr_x2",
    "sr-x3": "sr_x3",
    "sr-x4": "sr_x4",
    "denoise-15": "dn_g15",
    "denoise-25": "dn_g25",
    "denoise-50": "dn_g50",
    "derain-light": "dr_L",
    "derain-heavy": "dr_H",
}
TASKS = tuple(TASK_KEYS)
KEY_TASKS = {v: k for k, v in TASK_KEYS.items()}

#: size name -> (num_feat, embed_dim, depths, heads_per_branch, default SR upsampler)
SIZES = {
    "T": (8, 60, (6, 6, 6, 6), 6, "pixelshuffledirect"),
    "S": (16, 120, (6, 6, 6, 6, 6), 6, "pixelshuffle"),
    "B": (32, 180, (6, 6, 6, 6, 6, 6), 6, "pixelshuffle"),
    "L": (64, 240, (6,) * 12, 8, "pixelshuffle"),
}

#: DIV2K RGB mean, subtracted on the way in and added on the way out (image range 1.0). Not in the state dict.
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)


def task_kind(task: str) -> str:
    """'sr', 'denoise' or 'derain'."""
    return task.split("-")[0]


def task_scale(task: str) -> int:
    return int(task[4:]) if task.startswith("sr-x") else 1


def check_task(task: str) -> str:
    if task not in TASK_KEYS:
        raise ValueError(f"unknown task {task!r}; expected one of: {' '.join(TASKS)}")
    return task


@dataclass(frozen=True)
class EDTConfig:
    """Everything that defines an EDT network. ``size`` is informative; the numbers are what count."""

    tasks: tuple[str, ...] = ("sr-x2",)
    num_feat: int = 32
    embed_dim: int = 180
    depths: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    heads: int = 6  # per branch (horizontal and vertical each)
    window_size: tuple[int, int] = (6, 24)  # horizontal window (rows, cols); the vertical one is transposed
    shift_size: tuple[int, int] | None = None  # default: half the window
    mlp_ratio: float = 2.0
    upsampler: str = "pixelshuffle"  # or "pixelshuffledirect" (one conv + shuffle, no last conv)
    downsample: bool = True  # denoise/derain heads go to H/4 (False: the EDT-SF variant)
    drop_path: float = 0.1
    mask_tokens: int = 48  # token grid side the official mask buffers are stored for (48, or 144 for SF)
    size: str | None = "B"

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(check_task(t) for t in self.tasks))
        if not self.tasks:
            raise ValueError("an EDT model needs at least one task")
        order = [t for t in TASKS if t in self.tasks]
        if len(order) != len(self.tasks):
            raise ValueError(f"duplicate tasks in {self.tasks}")
        object.__setattr__(self, "tasks", tuple(order))
        object.__setattr__(self, "window_size", tuple(int(v) for v in self.window_size))
        object.__setattr__(self, "depths", tuple(int(v) for v in self.depths))
        wh, ww = self.window_size
        if self.shift_size is None:
            object.__setattr__(self, "shift_size", (wh // 2, ww // 2))
        object.__setattr__(self, "shift_size", tuple(int(v) for v in self.shift_size))
        if self.upsampler not in ("pixelshuffle", "pixelshuffledirect"):
            raise ValueError(f"unknown upsampler {self.upsampler!r}")
        if self.embed_dim % 2 or (self.embed_dim // 2) % self.heads:
            raise ValueError(f"embed_dim {self.embed_dim} must split into 2 branches of {self.heads} heads")

    @classmethod
    def preset(cls, size: str, tasks=("sr-x2",), **overrides) -> EDTConfig:
        """EDT-T/S/B/L (``size`` 'T', 'S', 'B', 'L', or 'edt-b' style); ``sf=True`` gives EDT-SF."""
        key = size.upper().replace("EDT-", "").replace("EDT", "")
        sf = overrides.pop("sf", False) or key.endswith("SF")
        key = key.removesuffix("SF")
        if key not in SIZES:
            raise ValueError(f"unknown EDT size {size!r}; expected one of T, S, B, L")
        nf, dim, depths, heads, up = SIZES[key]
        base = dict(tasks=tuple(tasks), num_feat=nf, embed_dim=dim, depths=depths, heads=heads, upsampler=up,
                    size=key + ("SF" if sf else ""), downsample=not sf, mask_tokens=144 if sf else 48)
        base.update(overrides)
        return cls(**base)

    @property
    def window_lcm(self) -> int:
        return math.lcm(*self.window_size)

    def size_multiple(self, task: str) -> int:
        """Input sides must be multiples of this: lcm of the window sides, times 4 when the head downsamples."""
        down = task_kind(check_task(task)) != "sr" and self.downsample
        return self.window_lcm * (4 if down else 1)

    def replace(self, **kw) -> EDTConfig:
        return replace(self, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Two formulations of the attention: the plain reference and the fast default
# ---------------------------------------------------------------------------------------------------------------

#: "fast" (default): both branches' windows gathered in one copy, one attention call, one LePE conv.
#: "reference": the straightforward formulation (roll, window partition, softmax(q kᵀ·scale + mask) v, roll back),
#: kept to test the fast path against and to read the model by.
ATTENTION_PATHS = ("fast", "reference")
_path = ["fast"]


@contextlib.contextmanager
def attention_mode(path: str):
    """Run EDT models with the ``fast`` or the ``reference`` attention inside the ``with`` block."""
    if path not in ATTENTION_PATHS:
        raise ValueError(f"unknown attention path {path!r}; expected one of: {', '.join(ATTENTION_PATHS)}")
    old, _path[0] = _path[0], path
    try:
        yield
    finally:
        _path[0] = old


def reference_mode():
    """``with reference_mode(): model(x)`` runs the plain reference formulation."""
    return attention_mode("reference")


def exporting() -> bool:
    """True while tracing or exporting. Then masks and gather indices are computed with tensor ops from the
    traced shape instead of read from a cache keyed by Python ints, so one exported graph serves every size."""
    is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or (is_exporting and is_exporting()))


#: Set to False before the first forward pass on the CPU (or EDTIR_TUNE_ALLOCATOR=0 in the environment) to leave
#: the C allocator's settings alone: the tuning is process-wide.
TUNE_CPU_ALLOCATOR = os.environ.get("EDTIR_TUNE_ALLOCATOR", "1") != "0"
_allocator = {"tuned": None}


def tune_cpu_allocator() -> bool:
    """Let glibc keep freed memory for reuse (mmap threshold 256 MiB, trim threshold 512 MiB) instead of handing
    every large tensor back to the OS and faulting fresh pages in for the next one. EDT-B x2 on 72x72 otherwise
    takes up to about 117,000 page faults (0.24 s of system time) per forward pass on the CPU; with it, none
    (``benchmarks/cpu_microbench.py --only faults``). Applied
    once per process on the first CPU forward pass (``TUNE_CPU_ALLOCATOR``); a no-op without glibc. The same
    effect from the shell: ``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=536870912``."""
    if _allocator["tuned"] is None:
        _allocator["tuned"] = False
        if TUNE_CPU_ALLOCATOR and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                m_trim_threshold, m_mmap_threshold = -1, -3
                _allocator["tuned"] = bool(libc.mallopt(m_mmap_threshold, 256 << 20)
                                           and libc.mallopt(m_trim_threshold, 512 << 20))
            except (OSError, AttributeError):
                pass
    return _allocator["tuned"]


def head_pad(device: torch.device, head_dim: int, explicit: bool = False) -> tuple[int, int]:
    """Head dims (q and k, v) the fast path computes attention with. CUDA's fused kernels need a multiple of 8
    (EDT has 5, 10, 15); on the CPU the flash kernel runs fastest at 16 (one AVX-512 register): EDT-B's attention
    takes a third less time at 16 than at 15, EDT-T's a little less at 16 than at 5. In inference the CPU's
    explicit attention (:func:`windowed_attention`, ``explicit``) pads EDT-T's q and k to 8 only: ``q kᵀ`` over 8
    takes 0.6 of the time over 16, while ``softmax · v`` wants v 16 wide (2.5x faster than 8), and the qkv
    projection comes out a third narrower. (Training without the C kernels keeps 16: its backward forms dq and dk,
    products as narrow as q and k; the CPU's training kernel takes them unpadded, see
    :meth:`EDTBlock.attention_fast`.) Zero columns change no logit and no output; they come out of the qkv
    projection (see :meth:`EDTBlock.qkv_weight`)."""
    if device.type == "cpu" and head_dim <= 16:
        return (8, 16) if explicit and head_dim <= 8 else (16, 16)
    pad = -(-head_dim // 8) * 8
    return pad, pad


#: CPU fp32 inference computes attention explicitly, a few windows at a time (:func:`windowed_attention`);
#: EDTIR_CPU_EXPLICIT_ATTENTION=0 in the environment (or ``with explicit_attention(False):``) sends it to the flash
#: kernel as everywhere else. ``benchmarks/cpu_attention.py`` measures both.
explicit_attention = Switch("EDTIR_CPU_EXPLICIT_ATTENTION")
#: the largest head dim that goes the explicit way (EDT's are 5, 10 and 15; see :func:`head_pad` for their padding)
EXPLICIT_MAX_HEAD_DIM = 16
#: window-heads per chunk of :func:`windowed_attention`: their logits (32 x 144 x 144 fp32, 2.5 MiB) stay in cache
ATTENTION_CHUNK = 32


def use_explicit_attention(x: torch.Tensor, head_dim: int) -> bool:
    """CPU, float32 (no autocast), not exporting: inference, and training (whose backward recomputes the
    probabilities chunk by chunk, :class:`_WindowedAttentionGrad`, unless a C kernel takes it). Training on a CPU
    without AVX-512 only where the 8-lane training kernels serve (or the AVX-512 ones are forced): PyTorch's
    explicit attention there took an EDT-T training step in 13.4 s against 12.4 with torch's fused one (2
    threads), where the AVX-512 VM had it the other way round (7.19 against 7.04 s)."""
    return (explicit_attention.on and head_dim <= EXPLICIT_MAX_HEAD_DIM and x.device.type == "cpu"
            and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and not exporting()
            and (not torch.is_grad_enabled() or cpu_kernel.wanted() or cpu_kernel.native_avx512() is not False
                 or cpu_kernel.training_library() is not None))


def _chunks(nw: int, heads: int, chunk: int | None, bias_from: int, period: int | None):
    """(i, j, b0, b1) per chunk of windows: the chunk is windows [i, j); its windows [i + b0, j) take the shift
    bias, rows [b1 - (j - i - b0), b1) of the per-image tail bias (``b0 == j - i`` when none)."""
    period = period or nw
    step = max(1, (chunk or ATTENTION_CHUNK) // heads)
    for start in range(0, nw, period):  # each image of a batch
        for i in range(start, min(nw, start + period), step):
            j = min(start + period, i + step)
            first = max(i, start + bias_from)  # the first window of the chunk with a bias
            yield i, j, min(first, j) - i, j - start - bias_from


def windowed_attention(q, k, v, bias=None, scale: float = 1.0, chunk: int | None = None, bias_from: int = 0,
                       period: int | None = None) -> torch.Tensor:
    """softmax(q kᵀ·scale + bias) v for (windows, heads, N, d) q/k/v (v may be wider than q and k), a few windows
    at a time; returns (windows, heads, N, v's d). On the CPU this beats torch's flash kernel, which costs about
    the same per logit whatever the head dim (2.9 billion logits in an EDT-T pass at 264x264) and hardly gains
    from a second thread at EDT's window sizes; the logits of a chunk stay in cache, and the products split
    across threads. With autograd (training) the backward recomputes each chunk's probabilities instead of
    keeping them (:class:`_WindowedAttentionGrad`).

    ``bias`` (one per window, broadcast over heads) need only cover the windows that have one: those at
    positions ``bias_from`` and later within every ``period`` windows (one image of a batch); a shifted pass puts
    its mixed windows last (:class:`WindowLayout`), so most windows skip the addition. With ``scale`` 1 (folded
    into q) the logits take no extra pass; softmax runs in place and the second product writes into the output.
    A contiguous copy of all of q/k/v first was slower (for EDT-T at 264x264 it moves 160 MB a block)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if scale != 1.0:
            q = q * scale
        return _WindowedAttentionGrad.apply(q, k, v, bias, chunk, bias_from, period)
    nw, heads, n, _ = q.shape
    out = v.new_empty(nw, heads, n, v.shape[-1])
    for i, j, b0, b1 in _chunks(nw, heads, chunk, bias_from, period):
        torch.matmul(_probabilities(q[i:j], k[i:j], bias, b0, b1, scale), v[i:j], out=out[i:j])
    return out


def _probabilities(q, k, bias, b0: int, b1: int, scale: float = 1.0) -> torch.Tensor:
    """softmax(q kᵀ·scale + bias) for one chunk, in one buffer (see :func:`_chunks` for b0, b1)."""
    logits = torch.matmul(q, k.transpose(-1, -2))  # (w, heads, N, N)
    if scale != 1.0:
        logits.mul_(scale)
    if bias is not None and b0 < len(logits):
        logits[b0:] += bias[b1 - (len(logits) - b0):b1]
    return torch._softmax(logits, -1, False, out=logits)  # in place: a row is read before it is written


class _WindowedAttentionGrad(torch.autograd.Function):
    """:func:`windowed_attention` for training on the CPU. The forward keeps q, k, v and the output, not the
    probabilities (EDT-T, batch 64 at 48x48: about 1 GB a block); the backward recomputes them a chunk at a
    time and forms the gradients there: dv = Pᵀ dO, dS = P (dO vᵀ - rowsum(dO O)), dq = dS k, dk = dSᵀ q.
    ``benchmarks/train_speed.py --compare-attention`` times it against torch's fused kernel."""

    @staticmethod
    def forward(ctx, q, k, v, bias, chunk, bias_from, period):
        out = windowed_attention(q.detach(), k.detach(), v.detach(), bias, 1.0, chunk, bias_from, period)
        ctx.save_for_backward(q, k, v, out)
        ctx.bias, ctx.plan = bias, (chunk, bias_from, period)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out = ctx.saved_tensors
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # each is read twice below: one copy, not two
        chunk, bias_from, period = ctx.plan
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        row = (d_out * out).sum(-1, keepdim=True)  # (windows, heads, N, 1): rowsum(dO O) = rowsum(dP P)
        for i, j, b0, b1 in _chunks(q.shape[0], q.shape[1], chunk, bias_from, period):
            p = _probabilities(q[i:j], k[i:j], ctx.bias, b0, b1)
            torch.matmul(p.transpose(-1, -2), d_out[i:j], out=dv[i:j])
            ds = torch.matmul(d_out[i:j], v[i:j].transpose(-1, -2)).sub_(row[i:j]).mul_(p)
            torch.matmul(ds, k[i:j], out=dq[i:j])
            torch.matmul(ds.transpose(-1, -2), q[i:j], out=dk[i:j])
        return dq, dk, dv, None, None, None, None


_onednn = {"ok": None}


def _onednn_linear() -> bool:
    """Whether this build has oneDNN's fused linear and convolution (``torch.ops.mkldnn._linear_pointwise`` and
    ``_convolution_pointwise``, what inductor uses on the CPU) and they compute what the plain ops do; probed
    once."""
    if _onednn["ok"] is None:
        try:
            op = torch.ops.mkldnn._linear_pointwise
            x, w, b = torch.linspace(-1, 1, 6).view(2, 3), torch.linspace(-2, 1, 12).view(4, 3), torch.ones(4)
            img, k = torch.linspace(-1, 1, 2 * 3 * 4 * 5).view(1, 2, 15, 4).permute(0, 3, 1, 2), torch.ones(4, 1, 3, 3)
            conv = torch.ops.mkldnn._convolution_pointwise(img, k, b, [1, 1], [1, 1], [1, 1], 4, "gelu", [], "none")
            _onednn["ok"] = bool(torch.allclose(op(x, w, b, "gelu", [], "none"), F.gelu(F.linear(x, w, b)))
                                 and torch.allclose(op.binary(x, 2 * b.expand(2, 4), w, b, "add"),
                                                    F.linear(x, w, b) + 2)
                                 and torch.allclose(conv, F.gelu(F.conv2d(img, k, b, padding=1, groups=4)),
                                                    atol=1e-6))
        except (AttributeError, RuntimeError):
            _onednn["ok"] = False
    return _onednn["ok"]


def onednn_inference(x: torch.Tensor) -> bool:
    """Fast path, CPU, float32, no autograd, no autocast, not compiling or exporting: where oneDNN's fused ops
    serve."""
    return (_path[0] == "fast" and not exporting() and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and _onednn_linear())


def rows_to_8(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer's weight and bias with zero output rows up to a multiple of 8 (see :func:`linear`)."""
    n = -weight.shape[0] % 8
    return F.pad(weight, (0, 0, 0, n)), F.pad(bias, (0, n))


def linear(layer: nn.Linear, x: torch.Tensor, gelu: bool = False, residual: torch.Tensor | None = None,
           weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, padded: bool = False) -> torch.Tensor:
    """``residual + gelu?(x @ weightᵀ + bias)``, with ``layer``'s weight and bias unless given. On the fast path,
    for CPU inference in float32: one oneDNN call with the GELU or the residual add fused in (a pass over memory
    fewer, and oneDNN's products beat MKL's at EDT's widths). Elsewhere on the fast path an output width that is
    not a multiple of 8 is padded with zero rows and cropped back: products 180 or 540 wide (EDT-B) run far
    slower than 184 or 544 wide. ``padded``: not cropped back (the caller reads past the padding: the CPU training
    kernel, which so saves the crop's copy and, in the backward, a zero fill and a copy; docs/performance.md)."""
    w = layer.weight if weight is None else weight
    b = layer.bias if bias is None else bias
    fast = _path[0] == "fast" and not exporting()
    if onednn_inference(x):
        op = torch.ops.mkldnn._linear_pointwise
        if residual is not None and not gelu:
            return op.binary(x, residual, w, b, "add")
        y = op(x, w, b, "gelu" if gelu else "none", [], "none" if gelu else "")
        return y if residual is None else residual + y
    n = w.shape[0]
    if fast and n % 8:
        y = F.linear(x, *rows_to_8(w, b))
        y = y if padded and not gelu and residual is None else y[..., :n]
    else:
        y = F.linear(x, w, b)
    if gelu:
        y = F.gelu(y)
    return y if residual is None else residual + y


# ---------------------------------------------------------------------------------------------------------------
# Windows and shift masks
# ---------------------------------------------------------------------------------------------------------------

def window_partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(B, H, W, ...) -> (B * nW, wh * ww, ...), windows in row-major grid order, batch-major."""
    B, H, W = x.shape[:3]
    rest = x.shape[3:]
    x = x.view(B, H // wh, wh, W // ww, ww, *rest)
    x = x.transpose(2, 3)
    return x.reshape(B * (H // wh) * (W // ww), wh * ww, *rest)


def window_reverse(windows: torch.Tensor, wh: int, ww: int, B: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`."""
    rest = windows.shape[2:]
    x = windows.view(B, H // wh, W // ww, wh, ww, *rest)
    return x.transpose(2, 3).reshape(B, H, W, *rest)


def shift_mask(H: int, W: int, window: tuple[int, int], shift: tuple[int, int],
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Swin-style mask (nW, N, N) for a shifted window pass over an H x W token map: 0 within a region,
    -100 between positions that the cyclic shift brought together from different regions."""
    wh, ww = window
    sh, sw = shift
    region = torch.zeros(1, H, W, device=device)
    label = 0
    for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            region[:, hs, ws] = label
            label += 1
    ids = window_partition(region, wh, ww)  # (nW, N)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return diff.ne(0).float() * -100.0


class MaskCache:
    """Shift masks per (H, W, device), computed once and shared by every shifted block of a model.

    Only a few sizes are kept (tiled inference and training reuse one size); masks of other sizes are rebuilt on
    demand, never inside a per-block loop."""

    def __init__(self, window: tuple[int, int], shift: tuple[int, int], keep: int = 4):
        self.window, self.shift, self.keep = window, shift, keep
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, H: int, W: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (H, W, str(device))
        hit = self._cache.pop(key, None)
        if hit is None:
            wh, ww = self.window
            sh, sw = self.shift
            with torch.inference_mode(False):  # cached: usable later with autograd too
                hit = (shift_mask(H, W, (wh, ww), (sh, sw), device), shift_mask(H, W, (ww, wh), (sw, sh), device))
        self._cache[key] = hit  # most recent last
        while len(self._cache) > self.keep:
            self._cache.pop(next(iter(self._cache)))
        return hit


def _wrap(i: torch.Tensor, length) -> torch.Tensor:
    """``i % length`` for i in [-length, 2 * length), without a modulo by a traced size (which the ONNX
    exporter cannot translate)."""
    return torch.where(i >= length, i - length, torch.where(i < 0, i + length, i))


def _axis(length, win: int, shift: int, device):
    """Along one axis of a map rolled by -shift: (source position, region label), each (windows, win).
    ``length`` may be a traced size. Labels follow the slices [0, -win), [-win, -shift), [-shift, end)."""
    i = torch.arange(length, device=device)
    src = _wrap(i + shift, length)
    label = (i >= length - win).long() + (i >= length - shift).long() if shift else torch.zeros_like(i)
    return src.view(-1, win), label.view(-1, win)


def window_grid(H, W, window: tuple[int, int], shift: tuple[int, int], device, transposed: bool = False):
    """For windows of ``window`` over an H x W map rolled by -``shift``: the flat source position (y * W + x) and
    the shift-region label of every token, both (nW, N), windows in row-major grid order. Tokens are in row-major
    order inside a window, or column-major with ``transposed`` (a vertical window then reads like a horizontal
    one). Tensor ops only: H and W may be traced sizes."""
    (wh, ww), (sh, sw) = window, shift
    rs, rl = _axis(H, wh, sh, device)
    cs, cl = _axis(W, ww, sw, device)
    pos = rs[:, None, :, None] * W + cs[None, :, None, :]  # (nWh, nWw, wh, ww)
    label = rl[:, None, :, None] * 3 + cl[None, :, None, :]
    if transposed:
        pos, label = pos.transpose(2, 3), label.transpose(2, 3)
    return pos.reshape(-1, wh * ww), label.reshape(-1, wh * ww)


def region_bias(label: torch.Tensor) -> torch.Tensor:
    """(..., N) region labels -> (..., N, N) additive bias: -100 between tokens of different regions."""
    return label.unsqueeze(-1).ne(label.unsqueeze(-2)).float() * -100.0


def traced_shift_mask(H, W, window: tuple[int, int], shift: tuple[int, int], device) -> torch.Tensor:
    """:func:`shift_mask` with tensor ops only (for tracing and export); equal to it."""
    return region_bias(window_grid(H, W, window, shift, device)[1])


class WindowLayout:
    """Where every token goes in the fast path, for one map size (H, W) and both branches.

    The qkv projection is laid out per token as [horizontal branch | vertical branch] (see
    :meth:`EDTBlock.qkv_weight`). One gather (``index_select`` with ``gather[shifted]``) takes the rolled map
    straight to windows, ordered (window, branch, token): the two branches become one batch of equal windows,
    because the vertical branch reads its windows transposed. ``scatter[shifted]`` is the inverse permutation
    (back to the map, rolled back, branches side by side as ``proj`` wants them).

    In a shifted pass only the windows along the bottom and right edges mix regions of the rolled map and need
    the additive shift mask (Swin's -100); with ``sort`` (not when exporting) the gather puts them last, from
    window row ``bias_from`` on, so the CPU's attention adds the mask to those windows only (a tenth of them for
    a 264x264 map). The windows' order is free: each attends on its own and the scatter undoes the gather."""

    def __init__(self, H, W, window: tuple[int, int], shift: tuple[int, int], device, sort: bool = True):
        wh, ww = window
        sh, sw = shift
        self.window = window
        self.gather, self.scatter = [], []
        for shifted in (False, True):
            s_h, s_v = ((sh, sw), (sw, sh)) if shifted else ((0, 0), (0, 0))
            pos_h, lab_h = window_grid(H, W, (wh, ww), s_h, device)
            pos_v, lab_v = window_grid(H, W, (ww, wh), s_v, device, transposed=True)
            first, sorted_ = 0, shifted and sort
            if sorted_:
                (pos_h, lab_h, plain_h), (pos_v, lab_v, plain_v) = self._mixed_last(pos_h, lab_h), \
                    self._mixed_last(pos_v, lab_v)
                first = min(plain_h, plain_v)  # window pairs before it have no mask in either branch
            rows = torch.stack([pos_h * 2, pos_v * 2 + 1], dim=1).reshape(-1)  # source row (token, branch)
            self.gather.append(rows)
            # the natural order has a closed-form inverse (tensor ops on a traced shape, for export); a sorted one
            # is inverted by assignment
            self.scatter.append(torch.empty_like(rows).index_put_((rows,), torch.arange(rows.numel(), device=device))
                                if sorted_ else self._inverse(H, W, window, s_h, s_v, device))
            if shifted:
                #: window rows (window, branch) of one image from which on the shift bias applies
                self.bias_from = 2 * first
                self._bias = region_bias(torch.stack([lab_h, lab_v], dim=1)[first:]).flatten(0, 1).unsqueeze(1)
        self.windows = 2 * pos_h.shape[0]  # window rows per image
        self._batched_cache: dict[tuple, torch.Tensor | tuple] = {}

    @staticmethod
    def _mixed_last(pos: torch.Tensor, label: torch.Tensor):
        """Windows (rows of ``pos``/``label``) reordered with the single-region ones first, and how many those are."""
        mixed = label.ne(label[:, :1]).any(dim=1)
        order = torch.cat([torch.nonzero(~mixed).flatten(), torch.nonzero(mixed).flatten()])
        return pos[order], label[order], int((~mixed).sum())

    @staticmethod
    def _inverse(H, W, window, s_h, s_v, device) -> torch.Tensor:
        """For each (pixel, branch) of the map, its row in the gathered (window, branch, token) order."""
        (wh, ww), N = window, window[0] * window[1]
        y = torch.arange(H, device=device)[:, None]
        x = torch.arange(W, device=device)[None, :]
        out = []
        for br, (a, b), (sa, sb) in ((0, (wh, ww), s_h), (1, (ww, wh), s_v)):
            i, j = _wrap(y - sa, H), _wrap(x - sb, W)  # position in the rolled map
            win = (i // a) * (W // b) + j // b
            tok = (i % a) * b + j % b if br == 0 else (j % b) * a + i % a  # vertical: column-major
            out.append((win * 2 + br) * N + tok)
        return torch.stack(out, dim=-1).reshape(-1)  # (H * W * 2,), pixel-major, branch-minor

    def indices(self, batch, shifted: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(gather, scatter) over the rows of the whole batch, (batch * rows, ...) viewed as one matrix: a row gather
        along dim 0 of a 2-D tensor is a plain copy per row, faster than a gather along dim 1."""
        s = int(shifted)
        if exporting():
            return tuple(self._batched(t, batch) for t in (self.gather[s], self.scatter[s]))
        return self._remember(("rows", batch, s), lambda: (self._batched(self.gather[s], batch),
                                                           self._batched(self.scatter[s], batch)))

    def _remember(self, key, make):
        if key not in self._batched_cache:
            if len(self._batched_cache) >= 8:  # a few batch sizes and dtypes at a time
                self._batched_cache.clear()
            with torch.inference_mode(False):
                self._batched_cache[key] = make()
        return self._batched_cache[key]

    @staticmethod
    def _batched(index: torch.Tensor, batch) -> torch.Tensor:
        offsets = torch.arange(batch, device=index.device).unsqueeze(1) * index.shape[0]
        return (offsets + index).reshape(-1)

    def bias(self, batch, dtype: torch.dtype) -> torch.Tensor:
        """Shift bias (batch * nW * 2, 1, N, N) for every window row (broadcast over heads; zeros for the rows
        before ``bias_from``), as the fused attention kernels take it; cached per batch size and dtype."""
        def full():
            b = self._bias.to(dtype)
            if self.bias_from:
                b = torch.cat([b.new_zeros(self.bias_from, *b.shape[1:]), b])
            return b.unsqueeze(0).expand(batch, *b.shape).reshape(-1, *b.shape[1:])

        if exporting():  # ``batch`` may be a traced size: no Python test on it
            return full()
        return self._remember(("bias", batch, dtype), full)

    def key_major_bias(self) -> torch.Tensor:
        """:meth:`tail_bias` as the CPU's 8-lane attention kernel reads it (:func:`cpu_kernel.bias_keys`), cached."""
        return self._remember("keys", lambda: cpu_kernel.bias_keys(self._bias, self.window[0] * self.window[1]))

    def tail_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """Shift bias of one image's window rows from ``bias_from`` on: ((nW * 2 - bias_from), 1, N, N)."""
        return self._bias if self._bias.dtype == dtype else self._remember(("tail", dtype),
                                                                          lambda: self._bias.to(dtype))


class LayoutCache:
    """:class:`WindowLayout` per (H, W, device), like :class:`MaskCache`; built fresh (with tensor ops on the traced
    shape) when tracing or exporting."""

    def __init__(self, window: tuple[int, int], shift: tuple[int, int], keep: int = 4):
        self.window, self.shift, self.keep = window, shift, keep
        self._cache: dict[tuple, WindowLayout] = {}

    def __call__(self, H, W, device) -> WindowLayout:
        if exporting():
            return WindowLayout(H, W, self.window, self.shift, device, sort=False)
        key = (int(H), int(W), str(device))
        hit = self._cache.pop(key, None)
        if hit is None:
            with torch.inference_mode(False):  # cached: usable later with autograd too
                hit = WindowLayout(H, W, self.window, self.shift, device)
        self._cache[key] = hit
        while len(self._cache) > self.keep:
            self._cache.pop(next(iter(self._cache)))
        return hit


class _Permute(torch.autograd.Function):
    """``x.index_select(0, index)`` for a permutation ``index`` whose inverse is known: the backward pass is
    another gather instead of a scatter-add into zeros."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse, index)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        inverse, index = ctx.saved_tensors
        return _Permute.apply(grad, inverse, index), None, None


def permute_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Rows of the 2-D ``x`` in the order ``index`` (a permutation, ``inverse`` its inverse)."""
    if x.requires_grad and torch.is_grad_enabled() and not exporting():
        return _Permute.apply(x, index, inverse)
    return x.index_select(0, index)


# ---------------------------------------------------------------------------------------------------------------
# Shifted crossed local attention with LePE
# ---------------------------------------------------------------------------------------------------------------

class LePEAttention(nn.Module):
    """Attention of one branch inside (wh x ww) windows. Positions come from LePE: a depthwise 3x3 conv on V,
    applied inside each window (zero padding at window borders) and added to the attention output.

    ``forward`` is the reference formulation; the fast path (:meth:`EDTBlock.attention`) runs both branches at
    once with the same parameters."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int]):
        super().__init__()
        self.heads, self.window = heads, window
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """qkv: (B, H, W, 3, c) -> (B, H, W, c)."""
        B, H, W, _, c = qkv.shape
        wh, ww = self.window
        n, hd, d = wh * ww, self.heads, self.head_dim
        win = window_partition(qkv, wh, ww)  # (B*nW, N, 3, c)
        q, k, v = win.view(-1, n, 3, hd, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, heads, N, d) each
        bw = q.shape[0]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*nW, heads, N, N)
        if mask is not None:  # (nW, N, N), the same for every image of the batch
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, hd, n, n) + mask.to(attn.dtype)[None, :, None]).view(bw, hd, n, n)
        out = attn.softmax(dim=-1) @ v
        # LePE on V inside each window; channel index is head * d + j, as in the official layout.
        lepe = self.lepe(v.transpose(-1, -2).reshape(bw, c, wh, ww)).view(bw, hd, d, n).transpose(-1, -2)
        out = (out + lepe).transpose(1, 2).reshape(bw, n, c)
        return window_reverse(out, wh, ww, B, H, W)


class AntiBlockingFFN(nn.Module):
    """fc1, GELU, depthwise 5x5 conv over the whole map (mixes across window borders), GELU, fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C), plus ``residual`` if given."""
        x = linear(self.fc1, x, gelu=True)
        if _path[0] == "fast" and not watched(self.dwconv) and cpu_kernel.serves8(x):
            # inference on a CPU without AVX-512: the conv and its GELU in C, 8 channels a vector (1.3-1.8x oneDNN's)
            return linear(self.fc2, cpu_kernel.dwconv_gelu8(x, self.dwconv.weight, self.dwconv.bias),
                          residual=residual)
        if (_path[0] == "fast" and torch.is_grad_enabled() and cpu_kernel.serves_training(x)
                and not watched(self.dwconv)):
            # training on the CPU: the conv and its GELU in C, with their backward (PyTorch's conv backward here
            # took a sixth of an EDT-T step)
            return linear(self.fc2, cpu_kernel.dwconv_gelu(x, self.dwconv.weight, self.dwconv.bias),
                          residual=residual)
        x = x.permute(0, 3, 1, 2)  # a channels-last (B, hidden, H, W) view
        if x.is_cuda and x.dtype != torch.float32 and not (torch.is_grad_enabled() and x.requires_grad):
            # bf16 inference: cuDNN's channels-last depthwise kernel took 2.8x PyTorch's NCHW one (copy included)
            # on an H200; fp32, training and the CPU are faster channels-last (benchmarks/dwconv_layouts.py)
            x = x.contiguous()
        if onednn_inference(x):  # the GELU fused into the conv (2 % of an EDT-B pass on 2 cores)
            c = self.dwconv
            x = torch.ops.mkldnn._convolution_pointwise(x, c.weight, c.bias, list(c.padding), list(c.stride),
                                                        list(c.dilation), c.groups, "gelu", [], "none")
        else:
            x = F.gelu(self.dwconv(x))
        return linear(self.fc2, x.permute(0, 2, 3, 1), residual=residual)


def watched(module: nn.Module) -> bool:
    """Whether forward hooks watch ``module`` (its own, or global ones): a kernel must not skip its call then."""
    from torch.nn.modules import module as M

    return bool(M._global_forward_hooks or M._global_forward_pre_hooks or module._forward_hooks
                or module._forward_pre_hooks)


class DropPath(nn.Module):
    """Stochastic depth, drawn per sample."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def factor(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample's factor, 0 or 1 / keep, shaped to broadcast over ``x``."""
        keep = 1.0 - self.p
        return x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * self.factor(x)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x + self(y)`` as one op (``addcmul``): the mask's multiply, its division and the residual add were
        three passes over the map each way (the elementwise ops of an EDT-T training step on a 2-core CPU went from
        234 to 148 ms, docs/performance.md)."""
        if not self.training or self.p == 0.0:
            return x + y
        return torch.addcmul(x, y, self.factor(y))


class EDTBlock(nn.Module):
    """Pre-norm transformer block: half the channels attend in horizontal windows, half in vertical ones;
    odd blocks shift both. The official mask buffers (``attn_mask_h/v``) are not kept here: masks come from the
    model's :class:`MaskCache` / :class:`LayoutCache` (see ``checkpoint.py`` for reading and writing the official
    buffers)."""

    def __init__(self, dim, heads, window, shift, mlp_ratio, drop_path, shifted: bool):
        super().__init__()
        wh, ww = window
        self.shifted = shifted
        self.shift_h = tuple(shift) if shifted else (0, 0)
        self.shift_v = (shift[1], shift[0]) if shifted else (0, 0)
        self.norm1 = nn.LayerNorm(dim)
        self.attns = nn.ModuleList([LePEAttention(dim // 2, heads, (wh, ww)),
                                    LePEAttention(dim // 2, heads, (ww, wh))])
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = AntiBlockingFFN(dim, int(dim * mlp_ratio))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path)
        self._perms: dict[tuple, torch.Tensor] = {}

    def attention_reference(self, x: torch.Tensor, masks) -> torch.Tensor:
        B, H, W, C = x.shape
        half = C // 2
        qkv = self.qkv(x).view(B, H, W, 3, C)  # [q | k | v]
        outs = []
        for branch, part, shift, mask in ((self.attns[0], qkv[..., :half], self.shift_h, masks[0]),
                                          (self.attns[1], qkv[..., half:], self.shift_v, masks[1])):
            if self.shifted:
                part = torch.roll(part, shifts=(-shift[0], -shift[1]), dims=(1, 2))
                out = branch(part, mask)
                outs.append(torch.roll(out, shifts=shift, dims=(1, 2)))
            else:
                outs.append(branch(part, None))
        return self.proj(torch.cat(outs, dim=-1))

    def qkv_weight(self, pads: tuple[int, int], scale_q: bool = False,
                   q_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``qkv``'s weight and bias with output rows in the fast path's per-token order (branch, q/k/v, head,
        dim) and each head's dim zero-padded to ``pads`` (q and k, v): the attention inputs come out of the
        projection ready; with ``scale_q`` the q rows are multiplied by the attention scale (a pass over the logits
        fewer), and by ``q_factor`` (the CPU kernel's log2(e), for its base-2 softmax)."""
        w, b = self.qkv.weight, self.qkv.bias
        C, heads, d = w.shape[1], self.attns[0].heads, self.attns[0].head_dim
        key = (pads, str(w.device))
        if key not in self._perms:
            order = [(t * C + br * (C // 2) + h * d + j if j < d else 3 * C, t == 0)
                     for br in range(2) for t in range(3) for h in range(heads) for j in range(pads[t == 2])]
            with torch.inference_mode(False):
                self._perms[key] = (torch.tensor([i for i, _ in order], device=w.device),
                                    torch.tensor([q for _, q in order], device=w.device))
        index, q_rows = self._perms[key]
        if max(pads) != d:  # row 3C is zeros
            w, b = torch.cat([w, w.new_zeros(1, C)]), torch.cat([b, b.new_zeros(1)])
        w, b = w.index_select(0, index), b.index_select(0, index)
        if scale_q:
            s = torch.where(q_rows, self.attns[0].scale * q_factor, 1.0).to(w.dtype)
            w, b = w * s[:, None], b * s
        return w, b

    def attention_fast(self, x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
        """Both branches in one pass: one gather from the (rolled) map to windows, one attention call over the
        windows of both branches, one grouped LePE conv, one gather back. Same arithmetic as the reference up to
        ``proj`` (which the caller applies, fused with the residual add)."""
        B, H, W, C = x.shape
        a = self.attns[0]
        heads, d, half = a.heads, a.head_dim, C // 2
        (wh, ww), n = layout.window, layout.window[0] * layout.window[1]
        explicit = use_explicit_attention(x, d)
        # training on the CPU: the C kernel with its own backward, on q, k and v as narrow as the heads; inference
        # on a CPU without AVX-512: the 8-lane C kernel, on q, k and v as narrow too
        trains = explicit and torch.is_grad_enabled() and cpu_kernel.serves_training(x, d)
        lanes8 = explicit and not trains and cpu_kernel.serves8(x, d)
        pk, pv = (d, d) if trains or lanes8 else head_pad(x.device, d, explicit and not torch.is_grad_enabled())
        w, b = self.qkv_weight((pk, pv), scale_q=explicit, q_factor=cpu_kernel.LOG2E if trains or lanes8 else 1.0)
        # (B, H, W, [branch, q/k/v, head, padded dim]), for the training kernel perhaps padded to whole vectors
        qkv = linear(self.qkv, x, weight=w, bias=b, padded=trains)
        gather, scatter = layout.indices(B, self.shifted)
        width = heads * (2 * pk + pv)  # per token and branch
        # LePE's kernels of both branches, each in its own window's frame (the vertical branch's windows are
        # transposed, so its kernel is too): (C, 1, 3, 3) and (C,)
        w_l = torch.cat([a.lepe.weight, self.attns[1].lepe.weight.transpose(-1, -2)])
        b_l = torch.cat([a.lepe.bias, self.attns[1].lepe.bias])
        if lanes8 or trains:  # the gathers, the attention and LePE in one call (with its backward when training)
            lepe = (w_l.view(2, half, 9).transpose(1, 2), b_l.view(2, half), (wh, ww))
            if trains:
                out = cpu_kernel.window_attention(qkv.reshape(-1, qkv.shape[-1]), heads, d,
                                                  layout.tail_bias(qkv.dtype) if self.shifted else None,
                                                  layout.bias_from, layout.windows, index=gather, n=n, lepe=lepe)
            else:
                out = cpu_kernel.window_attention8(qkv.reshape(-1, width), heads, d,
                                                   layout.key_major_bias() if self.shifted else None,
                                                   layout.bias_from, layout.windows, index=gather, n=n, lepe=lepe)
            return out.view(B, H, W, C)
        rows = permute_rows(qkv.reshape(-1, width), gather, scatter).view(-1, n, width)  # (B * nW * 2, N, width)
        q, k, v = (part.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B * nW * 2, heads, N, pk or pv)
                   for part in rows.split([heads * pk, heads * pk, heads * pv], dim=-1))
        if explicit:  # q comes pre-scaled; the mask goes to the windows that have one
            out = windowed_attention(q, k, v, layout.tail_bias(q.dtype) if self.shifted else None,
                                     bias_from=layout.bias_from, period=layout.windows)
        else:
            mask = layout.bias(B, q.dtype) if self.shifted else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.scale)
        # LePE of both branches as one grouped conv over windows seen as wh x ww images
        bw = q.shape[0] // 2
        img = v[..., :d].reshape(bw, 2, heads, n, d).permute(0, 1, 2, 4, 3).reshape(bw, C, wh, ww)
        lepe = F.conv2d(img, w_l, b_l, padding=1, groups=C).view(2 * bw, heads, d, n).permute(0, 3, 1, 2)
        out = out[..., :d].transpose(1, 2)  # (B*nW*2, N, heads, d)
        if out.requires_grad or lepe.requires_grad or exporting() or torch.compiler.is_compiling():
            out = (out + lepe).reshape(-1, half)  # (out= has no layout guarantee under torch.compile)
        else:  # written straight in the (window, token) row order the gather back reads
            out = torch.add(out, lepe, out=out.new_empty(out.shape)).view(-1, half)
        out = permute_rows(out, scatter, gather)  # (B * H * W * 2, half): [horizontal | vertical] per pixel
        return out.view(B, H, W, C)  # before ``proj``

    def forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        """x: (B, H, W, C); ``plan``: a :class:`WindowLayout` (fast path) or the (horizontal, vertical) shift
        masks (reference path)."""
        if isinstance(plan, tuple):
            x = x + self.drop_path(self.attention_reference(self.norm1(x), plan))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        if not self.training and not exporting() and not torch.compiler.is_compiling() and not self.hooked():
            if kernels.serves(x):
                try:
                    return self.forward_fused(x)
                except torch.OutOfMemoryError:
                    raise
                except Exception as e:  # kernels that do not compile here (an older GPU, another Triton)
                    kernels.disable(x.device, e)
            if onednn_inference(x) and cpu_kernel.serves(x, self.attns[0].head_dim):
                return self.forward_cpu(x)
        y = self.attention_fast(self.norm1(x), plan)
        if self.training and self.drop_path.p > 0:
            x = self.drop_path.add(x, linear(self.proj, y))
            return self.drop_path.add(x, self.mlp(self.norm2(x)))
        x = linear(self.proj, y, residual=x)  # the residual adds fuse into the products where they can
        return self.mlp(self.norm2(x), residual=x)

    def hooked(self) -> bool:
        """Whether forward hooks watch a layer inside the block (or every module, global hooks): the fused paths do
        not call the layers one by one, so a watched block takes the op-by-op path (feature capture for CKA hooks
        ``norm2``, for instance)."""
        return any(watched(m) for m in self.modules() if m is not self)

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """The fast path for fp32 inference on the CPU with the C kernels of :mod:`cpu_kernel`: the norm, the qkv
        product and both branches' attention (shift mask and LePE included) window by window, from the block's input
        to ``proj``'s input (no qkv map, gather, scatter, mask tensor or logits in memory); then ``proj``, the FFN
        and both residual adds in one pass over the rows."""
        a = self.attns[0]
        attention, ffn = self.cached_weights("cpu", self._cpu_weights)
        y = cpu_kernel.block_attention(x, attention, a.window, self.shift_h, a.heads, a.head_dim)
        return cpu_kernel.proj_ffn(y, x, ffn)

    def _cpu_weights(self) -> tuple:
        d = self.attns[0].head_dim
        wq, bq = self.qkv_weight((d, d), scale_q=True, q_factor=cpu_kernel.LOG2E)  # the kernel's softmax is base 2
        attention = cpu_kernel.attention_weights(self.norm1, wq, bq, *kernels.lepe_weights(self))
        return attention, cpu_kernel.ffn_weights(self.proj, self.norm2, self.mlp.fc1, self.mlp.dwconv, self.mlp.fc2)

    def cached_weights(self, tag: str, make) -> tuple[torch.Tensor, ...]:
        """``make()``'s weights, built once and kept while no parameter changes (each parameter's data pointer and
        version), one set per ``tag``."""
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        cache = self.__dict__.setdefault("_weights_cache", {})
        if tag not in cache or cache[tag][0] != key:
            with torch.inference_mode(False), torch.no_grad():  # kept: usable outside inference_mode too
                cache[tag] = (key, make())
        return cache[tag][1]

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The fast path for inference on CUDA, through the Triton kernels of :mod:`kernels`: layer norms that write
        the products' dtype, 16-aligned wide (zero columns; the weights get zero columns too), the second one fused
        with the residual add before it; both attention branches with the shift mask and LePE in one kernel that
        reads the qkv map and writes ``proj``'s input (no gather, scatter or mask tensor); the FFN's depthwise conv
        with its GELU in one kernel on the channel-last map. The matrix products run on weights laid out for this
        once (:meth:`fused_weights`): cuBLAS's, or Triton's with their epilogues (fc1's GELU, fc2's bias and residual
        add) where :func:`kernels.products_in_triton` says."""
        B, H, W, C = x.shape
        a = self.attns[0]
        dtype = kernels.out_dtype(x)
        wq, bq, wp, bp, w1, b1, w2, b2, lw, lb, *dw = self.fused_weights(dtype, x.device)
        width = wq.shape[1]
        triton_products = kernels.products_in_triton(dtype)  # "", "ffn", "all" or "norms": kernels.PRODUCTS
        if triton_products:
            wqt, bqf, wpt, bpf, w1t, b1f, w2t, b2f = self.cached_weights(
                f"products {dtype} {x.device}", lambda: kernels.product_weights((wq, bq), (wp, bp), (w1, b1), (w2, b2)))
        conv = self.mlp.dwconv
        if triton_products == "norms":  # each norm inside the product after it
            qkv = kernels.norm_linear(x, self.norm1, wqt, bqf, wq.shape[0])
            y = kernels.window_attention(qkv, (B, H, W), a.window, self.shift_h, a.heads, a.head_dim, lw, lb)
            x, h = kernels.norm_linear(x, self.norm2, w1t, b1f, w1.shape[0], gelu=True,
                                       add=kernels.linear(y, wpt, bpf, C))
            return kernels.linear(kernels.dwconv_gelu(h, conv.weight, conv.bias, laid=dw), w2t, b2f, C, residual=x)
        h = kernels.layer_norm(x, self.norm1, width=width)
        if triton_products == "all":
            qkv = kernels.linear(h, wqt, bqf, wq.shape[0])  # (B, H, W, [branch, q/k/v, head, D])
        else:
            qkv = F.linear(h, wq, bq)
        y = kernels.window_attention(qkv, (B, H, W), a.window, self.shift_h, a.heads, a.head_dim, lw, lb)
        y = kernels.linear(y, wpt, bpf, C) if triton_products == "all" else F.linear(y, wp, bp)[..., :C]
        x, h = kernels.layer_norm(x, self.norm2, add=y, width=width)  # the residual add and the norm in one pass
        if triton_products:  # GELU in fc1's kernel, fc2's bias and the residual add in fc2's
            h = kernels.dwconv_gelu(kernels.linear(h, w1t, b1f, w1.shape[0], gelu=True), conv.weight, conv.bias,
                                    laid=dw)
            return kernels.linear(h, w2t, b2f, C, residual=x)
        h = kernels.dwconv_gelu(F.gelu(F.linear(h, w1, b1)), conv.weight, conv.bias, laid=dw)
        return x + F.linear(h, w2, b2)[..., :C]

    def fused_weights(self, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
        """The weights :meth:`forward_fused` reads, in ``dtype``: qkv's rows in the attention kernel's order, q
        scaled, head dims padded (:meth:`qkv_weight`); zero columns where the norms' and the attention's outputs
        are padded; output rows padded to a multiple of 8 (``proj``, ``fc2``: 180 -> 184); LePE's kernels padded
        like v; the FFN's depthwise conv laid out for its kernel (:func:`kernels.dwconv_weights`). Built once and
        kept while no parameter changes (each parameter's data pointer and version)."""
        return self.cached_weights(f"fused {dtype} {device}", lambda: self._fused_weights(dtype))

    def _fused_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        a = self.attns[0]
        C = self.proj.weight.shape[0]
        pad, width = kernels.head_pad(a.head_dim), kernels.width_pad(C)
        wq, bq = self.qkv_weight((pad, pad), scale_q=True)
        wp, bp = rows_to_8(kernels.pad_columns(self.proj.weight, a.heads, a.head_dim), self.proj.bias)
        w2, b2 = rows_to_8(self.mlp.fc2.weight, self.mlp.fc2.bias)
        lw, lb = kernels.pad_lepe(*kernels.lepe_weights(self), a.heads, a.head_dim)
        return tuple(t.to(dtype).contiguous() for t in (
            F.pad(wq, (0, width - C)), bq, wp, bp, F.pad(self.mlp.fc1.weight, (0, width - C)), self.mlp.fc1.bias,
            w2, b2)) + (lw, lb) + kernels.dwconv_weights(self.mlp.dwconv.weight, self.mlp.dwconv.bias)


class ResidualGroup(nn.Module):
    def __init__(self, blocks: list[EDTBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, plan):
        for blk in self.blocks:
            x = blk(x, plan)
        return x


class Stage(nn.Module):
    """A group of blocks with a residual around it (no conv inside)."""

    def __init__(self, blocks: list[EDTBlock]):
        super().__init__()
        self.residual_group = ResidualGroup(blocks)

    def forward(self, x, plan):
        return self.residual_group(x, plan) + x


class PatchEmbedNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x)


class Body(nn.Module):
    """The shared transformer: (B, C, h, w) -> (B, C, h, w), with a long skip around it."""

    def __init__(self, cfg: EDTConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbedNorm(dim)
        rates = torch.linspace(0, cfg.drop_path, sum(cfg.depths)).tolist()
        self.layers = nn.ModuleList()
        i = 0
        for depth in cfg.depths:
            blocks = [EDTBlock(dim, cfg.heads, cfg.window_size, cfg.shift_size, cfg.mlp_ratio, rates[i + j],
                               shifted=j % 2 == 1) for j in range(depth)]
            self.layers.append(Stage(blocks))
            i += depth
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = nn.Conv2d(dim, dim, 3, padding=1)
        self.masks = MaskCache(cfg.window_size, cfg.shift_size)
        self.layouts = LayoutCache(cfg.window_size, cfg.shift_size)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def plan(self, H, W, device):
        """What the blocks need for this map size: a :class:`WindowLayout` (fast path) or the two shift masks
        (reference path), from the cache, or from tensor ops on the traced shape when tracing or exporting."""
        if _path[0] == "fast":
            return self.layouts(H, W, device)
        if exporting():
            (wh, ww), (sh, sw) = self.masks.window, self.masks.shift
            return (traced_shift_mask(H, W, (wh, ww), (sh, sw), device),
                    traced_shift_mask(H, W, (ww, wh), (sw, sh), device))
        return self.masks(H, W, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _allocator["tuned"] is None and x.device.type == "cpu" and not exporting() \
                and not torch.compiler.is_compiling():
            tune_cpu_allocator()
        H, W = x.shape[-2:]
        t = self.patch_embed(x.permute(0, 2, 3, 1))  # (B, H, W, C)
        plan = self.plan(H, W, x.device)
        for stage in self.layers:
            t = stage(t, plan)
        t = self.norm(t).permute(0, 3, 1, 2)
        return self.conv_after_body(t) + x


# ---------------------------------------------------------------------------------------------------------------
# Convolutional heads (encoders) and tails (decoders)
# ---------------------------------------------------------------------------------------------------------------

def lrelu(x):
    return F.leaky_relu(x, 0.2)


class HeadBlock(nn.Module):
    """LReLU(conv_2(LReLU(conv_1(x)))) + shortcut(x), in -> out; optionally a strided conv_down (no bias).
    Returns (features for the next stage, skip for the tail); the skip is taken before conv_down."""

    def __init__(self, cin, cout, down: bool):
        super().__init__()
        self.conv_1 = nn.Conv2d(cin, cin, 3, padding=1)
        self.conv_2 = nn.Conv2d(cin, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1)
        self.conv_down = nn.Conv2d(cout, cout, 4, stride=2, padding=1, bias=False) if down else None

    def forward(self, x):
        skip = lrelu(self.conv_2(lrelu(self.conv_1(x)))) + self.shortcut(x)
        return (self.conv_down(skip) if self.conv_down is not None else skip), skip


class TailResBlock(nn.Module):
    """As in the head but conv_1 changes the width: LReLU(conv_2(LReLU(conv_1(x)))) + shortcut(x)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv_1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv_2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return lrelu(self.conv_2(lrelu(self.conv_1(x)))) + self.shortcut(x)


class TailBlock(nn.Module):
    """Decoder step: conv (same size) or transposed conv (x2 up), concat([decoder, skip]), residual block."""

    def __init__(self, cin, cout, up: bool):
        super().__init__()
        if up:
            self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        else:
            self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.block = TailResBlock(2 * cout, cout)

    def forward(self, x, skip):
        x = self.up(x) if hasattr(self, "up") else self.conv(x)
        return self.block(torch.cat([x, skip], dim=1))


class Head(nn.Sequential):
    """conv 3->nf, block nf->2nf, block 2nf->4nf, conv 4nf->C. Returns (features, [skip 2nf, skip 4nf])."""

    def __init__(self, nf, dim, down: bool):
        super().__init__(nn.Conv2d(3, nf, 3, padding=1), HeadBlock(nf, 2 * nf, down), HeadBlock(2 * nf, 4 * nf, down),
                         nn.Conv2d(4 * nf, dim, 3, padding=1))

    def forward(self, x):
        x = self[0](x)
        x, s1 = self[1](x)
        x, s2 = self[2](x)
        return self[3](x), (s1, s2)


def upsampler(scale: int, cin: int, kind: str) -> nn.Sequential:
    if kind == "pixelshuffledirect":
        return nn.Sequential(nn.Conv2d(cin, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))
    if scale == 3:
        return nn.Sequential(nn.Conv2d(cin, 9 * cin, 3, padding=1), nn.PixelShuffle(3))
    layers = []
    for _ in range(int(math.log2(scale))):
        layers += [nn.Conv2d(cin, 4 * cin, 3, padding=1), nn.PixelShuffle(2)]
    return nn.Sequential(*layers)


class Tail(nn.Sequential):
    """Decoder: two TailBlocks joining the head's skips, then (SR) an upsampler and a last conv, or (DN/DR) the
    last conv. ``forward`` returns the residual to add to the (upscaled) mean-subtracted input."""

    def __init__(self, nf, dim, *, scale: int, up: bool, upsampler_kind: str):
        mods = [TailBlock(dim, 4 * nf, up), TailBlock(4 * nf, 2 * nf, up)]
        if scale > 1:
            mods.append(upsampler(scale, 2 * nf, upsampler_kind))
            if upsampler_kind == "pixelshuffle":
                mods.append(nn.Conv2d(2 * nf, 3, 3, padding=1))
        else:
            mods.append(nn.Conv2d(2 * nf, 3, 3, padding=1))
        super().__init__(*mods)

    def forward(self, x, skips):
        s1, s2 = skips
        x = self[0](x, s2)
        x = self[1](x, s1)
        for m in list(self)[2:]:
            x = m(x)
        return x


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ModelInfo:
    """What a caller needs to know about a model without guessing (in the spirit of spandrel's descriptors)."""

    arch: str
    size: str | None
    tasks: tuple[str, ...]
    scales: dict[str, int]
    size_multiples: dict[str, int]
    params: int
    window_size: tuple[int, int]
    upsampler: str
    downsample: bool
    precisions: tuple[str, ...] = ("fp32", "bf16")
    config: EDTConfig | None = field(default=None, repr=False)

    def describe(self) -> str:
        edt = self.arch == "EDT"
        lines = [f"architecture : {self.arch}" + (f" (EDT-{self.size})" if edt and self.size else ""),
                 f"tasks        : {', '.join(self.tasks)}",
                 "scale        : " + ", ".join(f"{t} x{s}" for t, s in self.scales.items()),
                 "size multiple: " + ", ".join(f"{t} {m}" for t, m in self.size_multiples.items()),
                 f"parameters   : {self.params:,}",
                 f"window       : {self.window_size[0]}x{self.window_size[1]} / "
                 f"{self.window_size[1]}x{self.window_size[0]}" if edt else None,
                 f"upsampler    : {self.upsampler}" if edt and any(s > 1 for s in self.scales.values()) else None,
                 f"variant      : {'EDT' if self.downsample else 'EDT-SF (no down-sampling)'}" if edt else None,
                 f"precisions   : {', '.join(self.precisions)}"]
        return "\n".join(line for line in lines if line)


class EDT(nn.Module):
    """One shared body, one head and one tail per task (attributes ``head_<key>`` / ``tail_<key>`` as in the
    official release: heads first, then the body, then the tails)."""

    def __init__(self, cfg: EDTConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(DIV2K_MEAN).view(1, 3, 1, 1), persistent=False)
        nf, dim = cfg.num_feat, cfg.embed_dim
        for t in cfg.tasks:
            setattr(self, "head_" + TASK_KEYS[t], Head(nf, dim, down=self._down(t)))
        self.body = Body(cfg)
        for t in cfg.tasks:
            setattr(self, "tail_" + TASK_KEYS[t], Tail(nf, dim, scale=task_scale(t), up=self._down(t),
                                                      upsampler_kind=cfg.upsampler))
        self.load_report = None  # filled by edtir.load_model

    def _down(self, task):
        return task_kind(task) != "sr" and self.cfg.downsample

    # -- descriptor ------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[str, ...]:
        return self.cfg.tasks

    def size_multiple(self, task: str | None = None) -> int:
        return self.cfg.size_multiple(self._task(task))

    def scale(self, task: str | None = None) -> int:
        return task_scale(self._task(task))

    @property
    def info(self) -> ModelInfo:
        c = self.cfg
        return ModelInfo(arch="EDT", size=c.size, tasks=c.tasks, scales={t: task_scale(t) for t in c.tasks},
                         size_multiples={t: c.size_multiple(t) for t in c.tasks},
                         params=sum(p.numel() for p in self.parameters()), window_size=c.window_size,
                         upsampler=c.upsampler, downsample=c.downsample, config=c)

    def _task(self, task: str | None) -> str:
        if task is None:
            if len(self.cfg.tasks) != 1:
                raise ValueError(f"this model has several tasks ({', '.join(self.cfg.tasks)}): pass task=...")
            return self.cfg.tasks[0]
        if task not in self.cfg.tasks:
            raise ValueError(f"task {task!r} is not in this model (it has: {', '.join(self.cfg.tasks)})")
        return task

    def _check_input(self, x: torch.Tensor, task: str):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected input of shape (B, 3, H, W), got {tuple(x.shape)}")
        m = self.cfg.size_multiple(task)
        H, W = x.shape[-2:]
        if H % m or W % m:
            raise ValueError(f"{task}: input {H}x{W} is not a multiple of {m}; pad to "
                             f"{-(-H // m) * m}x{-(-W // m) * m} (edtir.inference pads and crops for you)")

    # -- forward ---------------------------------------------------------------------------------------------
    def head(self, task: str, x: torch.Tensor):
        return getattr(self, "head_" + TASK_KEYS[task])(x - self.mean)

    def tail(self, task: str, feats, skips, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self, "tail_" + TASK_KEYS[task])(feats, skips)
        base = x - self.mean
        s = task_scale(task)
        if s > 1:
            base = F.interpolate(base, scale_factor=s, mode="bilinear", align_corners=False)
        return out + base + self.mean

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """x: (B, 3, H, W) in [0, 1] (noisy inputs may leave it) -> (B, 3, sH, sW)."""
        task = self._task(task)
        self._check_input(x, task)
        feats, skips = self.head(task, x)
        return self.tail(task, self.body(feats), skips, x)

    def forward_multi(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Multi-task step of the paper: every task's head output joins one batch through the shared body.
        All heads must give the same token grid (e.g. SR LR 48x48 and DN/DR 192x192)."""
        heads = {}
        for task, x in inputs.items():
            task = self._task(task)
            self._check_input(x, task)
            heads[task] = self.head(task, x)
        grids = {t: tuple(f.shape[-2:]) for t, (f, _) in heads.items()}
        if len(set(grids.values())) != 1:
            raise ValueError(f"multi-task inputs must give one token grid through the heads, got {grids}")
        feats = self.body(torch.cat([f for f, _ in heads.values()], dim=0))
        out, i = {}, 0
        for task, (f, skips) in heads.items():
            n = f.shape[0]
            out[task] = self.tail(task, feats[i:i + n], skips, inputs[task])
            i += n
        return out


def build_model(size: str = "B", tasks=("sr-x2",), **overrides) -> EDT:
    """A fresh EDT: ``build_model('T', ['sr-x2'])``, ``build_model('B', ['denoise-25'], sf=True)``."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    return EDT(EDTConfig.preset(size, tasks=tasks, **overrides))


def compile_blocks(model: nn.Module, mode: str | None = None) -> nn.Module:
    """``torch.compile`` each transformer block on its own, in place: the blocks share one compiled graph per variant
    (shifted or not), where compiling the whole model unrolls every block into one graph (minutes to build). For
    experiments and ``benchmarks/perf_suite.py --compile``: measured slower than the eager fast path on an H200 and on
    the CPU (docs/performance.md), so nothing in edtir calls it."""
    blocks = [m for m in model.modules() if isinstance(m, EDTBlock)]
    # In training each block has its own drop-path rate, a constant to the compiler: one graph per block, more
    # than dynamo's default limit of 8 recompilations of one code object (past it, the rest would run eager).
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 2 * len(blocks) + 8))
    for m in blocks:
        m.compile(dynamic=False, mode=mode)
    return model
