"""An EDT block for fp32 inference on the CPU as two C kernels, built into one library: the norm, the qkv product and
the window attention (``cpu_attention.c``), then ``proj`` with the FFN (``cpu_ffn.c``).

On a 2-core VM the eager fast path spent most of an EDT-T pass, and a third of an EDT-B one, in the attention:
batched products of 144 x 144 logits, softmax passes over them and the gathers around them
(docs/performance.md). The attention kernel does one (window, branch) at a time: it reads the window's pixels
from the block's input (roll, window partition and shift mask are index arithmetic), normalises them and projects
them to q, k and v in L2, then takes each head with the logits in L1, 16 queries per vector so that softmax needs
no horizontal reduction, and writes ``proj``'s input with LePE added. The products had run at the pace of memory,
not of the arithmetic: EDT-T's maps are 17 MB at 264x264 (qkv's 50 MB, fc1's output 33 MB) and each op read and
wrote one. The second kernel takes ``proj``, its residual add and the whole FFN row by row, with the rows in
flight (five, for the 5x5 depthwise conv) in L2.

No build step at install: on first use the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) builds
it with ``-O3 -march=native -fopenmp`` into the cache (``$EDTIR_CACHE_DIR``, else ``$XDG_CACHE_HOME/edtir``,
else ``~/.cache/edtir``; about a second, once per machine and source), written under a temporary name and
renamed (where the cache cannot be written, into a private temporary directory, each process).
Where that fails (no compiler, no OpenMP) or ``EDTIR_CPU_KERNEL=0``, the model keeps its PyTorch fast path;
:func:`status` says which and why. The kernel is checked against the reference formulation once per process
before it is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .switch import Switch

SOURCES = tuple(Path(__file__).with_name(n) for n in ("cpu_attention.c", "cpu_ffn.c"))
HEADERS = tuple(Path(__file__).with_name(n) for n in ("cpu_vec.h",))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno")
#: the largest head dim the kernel takes (EDT's are 5, 10 and 15)
MAX_HEAD_DIM = 16
#: the kernel computes softmax with 2^x: q's rows of the qkv weight carry this factor on top of the attention scale
LOG2E = 1.0 / math.log(2.0)

#: EDTIR_CPU_KERNEL=0 in the environment (or ``with cpu_kernel.enabled(False)``) keeps the PyTorch fast path
enabled = Switch("EDTIR_CPU_KERNEL")
_state: dict = {"lib": None, "error": None, "path": None}


def cache_dir() -> Path:
    if os.environ.get("EDTIR_CACHE_DIR"):
        return Path(os.environ["EDTIR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edtir"


def _compiler() -> list[str] | None:
    if os.environ.get("CC"):  # may carry arguments ("ccache gcc")
        return shlex.split(os.environ["CC"])
    found = next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)
    return [found] if found else None


def _machine() -> str:
    """What -march=native depends on: a library built for one CPU must not be loaded on another (a shared home)."""
    flags = ""
    with contextlib.suppress(OSError):
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (set CC, or install gcc or clang)")
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    text = [p.read_text() for p in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\n".join([*text, " ".join(FLAGS), version, _machine()]).encode()).hexdigest()
    path = cache_dir() / f"cpu_kernels-{key[:16]}.so"
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError:  # a read-only home: a private directory for this process (a shared one could be planted)
        path = Path(tempfile.mkdtemp(prefix="edtir-")) / path.name
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        run = subprocess.run([*cc, *FLAGS, "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeError(f"{Path(cc[0]).name} failed: {last[:200]}")
        os.replace(tmp, path)  # atomic: another process building the same key at once is harmless
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return path


class Kernels(NamedTuple):
    """The library's entry points."""
    attention: Callable
    proj_ffn: Callable


def _load() -> Kernels:
    path = _build()
    lib = ctypes.CDLL(str(path))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    attention = lib.edt_block_attention
    attention.restype = i32
    attention.argtypes = [ptr] * 4 + [ctypes.c_float] + [ptr] * 4 + [i32] * 11
    ffn = lib.edt_proj_ffn
    ffn.restype = i32
    ffn.argtypes = [ptr] * 3 + [i32] * 4 + [ptr] * 4 + [ctypes.c_float] + [ptr] * 2 + [i32] + [ptr] * 4 + [i32]
    _state["path"] = path
    kernels = Kernels(attention, ffn)
    _check(kernels)
    return kernels


def library() -> Kernels | None:
    """The kernels, built and checked on first call; None where they cannot serve (see :func:`status`)."""
    if _state["lib"] is None and _state["error"] is None:
        try:
            _state["lib"] = _load()
        except Exception as e:  # no compiler, a failed build, a wrong result: the PyTorch path serves
            _state["error"] = f"{type(e).__name__}: {e}"
    return _state["lib"]


def status() -> str:
    """One line: whether the C kernel serves on this machine, and why not."""
    if not enabled.on:
        return "off (EDTIR_CPU_KERNEL=0)"
    if library() is not None:
        return f"on ({_state['path']})"
    return f"unavailable ({_state['error']}); using the PyTorch fast path"


def serves(x: torch.Tensor, head_dim: int) -> bool:
    """CPU, float32 (no autocast), no autograd: inference. The caller checks for export and compile."""
    return (enabled.on and x.device.type == "cpu" and x.dtype == torch.float32 and head_dim <= MAX_HEAD_DIM
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and library() is not None)


#: the column width of the kernels' packed weights (4 vectors of 16); the last panel is as narrow as whole vectors allow
PANEL = 64


def packed_numel(n: int, k: int) -> int:
    """The floats :func:`panels` makes of an (n, k) weight: k rows of n columns rounded up to whole vectors of 16."""
    return k * -(-n // 16) * 16


def panels(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight (N, K) as the kernels read it, flat: panels of 64 columns (N // 64, K, 64), then the
    remaining columns (K, 16 v), zero beyond N, with v the fewest vectors of 16 that hold them."""
    n, k = weight.shape
    full = n // PANEL
    w = weight.detach().float()
    parts = [w[:full * PANEL].reshape(full, PANEL, k).transpose(1, 2).reshape(-1)]
    if n % PANEL:
        parts.append(F.pad(w[full * PANEL:], (0, 0, 0, -n % 16)).t().reshape(-1))
    return torch.cat(parts).contiguous()


class AttentionWeights(NamedTuple):
    """What :func:`block_attention` reads, packed once per block (:func:`attention_weights`)."""
    norm: torch.Tensor
    norm_bias: torch.Tensor
    eps: float
    qkv: torch.Tensor  # (2, ...): each branch's rows in panels (:func:`panels`)
    qkv_bias: torch.Tensor  # (2, 3 heads d)
    lepe: torch.Tensor  # (2, 9, heads d): tap-major
    lepe_bias: torch.Tensor  # (2, heads d)


def attention_weights(norm, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, lepe_weight: torch.Tensor,
                      lepe_bias: torch.Tensor) -> AttentionWeights:
    """``norm`` (``nn.LayerNorm``); the qkv weight (2 * 3 * heads * d, C) and bias with rows [branch][q, k, v][head]
    [d] and q's rows multiplied by the attention scale and :data:`LOG2E` (:meth:`edt.EDTBlock.qkv_weight`); LePE's
    3x3 kernels (2 * heads * d, 9) and biases, each branch's in its own window's frame
    (:func:`kernels.lepe_weights`)."""
    hd = lepe_bias.shape[0] // 2
    f = [t.detach().float().contiguous() for t in (norm.weight, norm.bias, qkv_bias, lepe_bias)]
    return AttentionWeights(f[0], f[1], float(norm.eps),
                            torch.stack([panels(w) for w in qkv_weight.detach().split(3 * hd)]),
                            f[2].view(2, 3 * hd), lepe_weight.detach().float().reshape(2, hd, 9).transpose(1, 2)
                            .contiguous(), f[3].view(2, hd))


def _call(fn, x: torch.Tensor, w: AttentionWeights, window, shift, heads: int, head_dim: int,
          threads: int) -> torch.Tensor:
    B, H, W, C = x.shape
    wh, ww = window
    hd = heads * head_dim
    if H % wh or W % ww or H % ww or W % wh:
        raise ValueError(f"block_attention: map {H}x{W} does not fit window {window}")
    if w.qkv.shape[1] != packed_numel(3 * hd, C) or w.qkv_bias.shape != (2, 3 * hd) or w.lepe.shape != (2, 9, hd):
        raise ValueError(f"block_attention: the weights do not fit {C} channels, {heads} heads of {head_dim}")
    x = x.contiguous()
    out = x.new_empty(B, H, W, 2 * hd)
    rc = fn(x.data_ptr(), out.data_ptr(), w.norm.data_ptr(), w.norm_bias.data_ptr(), w.eps, w.qkv.data_ptr(),
            w.qkv_bias.data_ptr(), w.lepe.data_ptr(), w.lepe_bias.data_ptr(), B, H, W, C, wh, ww, shift[0],
            shift[1], heads, head_dim, threads)
    if rc != 0:
        raise RuntimeError("edt_block_attention failed (out of memory?)")
    return out


def block_attention(x: torch.Tensor, weights: AttentionWeights, window: tuple[int, int], shift: tuple[int, int],
                    heads: int, head_dim: int) -> torch.Tensor:
    """An EDT block's first half up to ``proj``: the norm, the qkv product and both branches' attention with LePE.
    x (B, H, W, C) -> (B, H, W, 2 * heads * head_dim), [horizontal | vertical] as ``proj`` reads it. ``window`` is
    the horizontal branch's (the vertical one is its transpose), ``shift`` its roll ((0, 0) when not shifted)."""
    return _call(library().attention, x, weights, window, shift, heads, head_dim, torch.get_num_threads())


def reference_block_attention(x, norm, qkv_weight, qkv_bias, lepe_weight, lepe_bias, window, shift, heads,
                              head_dim) -> torch.Tensor:
    """The same from PyTorch's norm and product and the reference attention (q's rows *not* multiplied by
    :data:`LOG2E`: its softmax is e^x)."""
    from .kernels import reference_window_attention

    B, H, W, _ = x.shape
    qkv = F.linear(norm(x), qkv_weight, qkv_bias)
    return reference_window_attention(qkv, (B, H, W), window, shift, heads, head_dim, lepe_weight, lepe_bias,
                                      pad=head_dim)


def log2e_rows(qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, heads: int, head_dim: int):
    """The qkv weight and bias with q's rows multiplied by :data:`LOG2E`, as the kernel takes them."""
    f = torch.ones(2, 3, heads * head_dim)
    f[:, 0] = LOG2E
    f = f.flatten()
    return qkv_weight * f[:, None], qkv_bias * f


def _attention_case(gen, shape, C, heads, head_dim, gain=1.0):
    """A random input, norm, qkv weight and bias (q not scaled) and LePE weights for checking the attention
    kernel."""
    with torch.random.fork_rng(devices=[]):
        norm = torch.nn.LayerNorm(C)
    hd = heads * head_dim
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(C, generator=gen))
        norm.bias.copy_(0.2 * torch.randn(C, generator=gen))
    wq = torch.randn(6 * hd, C, generator=gen) * gain / math.sqrt(C)
    return (torch.randn(*shape, C, generator=gen) * 2 + 1, norm, wq, torch.randn(6 * hd, generator=gen) * 0.3,
            torch.randn(2 * hd, 9, generator=gen) * 0.3, torch.randn(2 * hd, generator=gen) * 0.3)


class FFNWeights(NamedTuple):
    """What :func:`proj_ffn` reads, packed once per block (:func:`ffn_weights`)."""
    proj: torch.Tensor
    proj_bias: torch.Tensor
    norm: torch.Tensor
    norm_bias: torch.Tensor
    eps: float
    fc1: torch.Tensor
    fc1_bias: torch.Tensor
    dwconv: torch.Tensor  # (25, hidden): tap-major
    dwconv_bias: torch.Tensor
    fc2: torch.Tensor
    fc2_bias: torch.Tensor


def ffn_weights(proj, norm, fc1, dwconv, fc2) -> FFNWeights:
    """The layers of a block's second half (``nn.Linear``, ``nn.LayerNorm``, the 5x5 depthwise ``nn.Conv2d``)."""
    if tuple(dwconv.kernel_size) != (5, 5) or tuple(dwconv.padding) != (2, 2) or dwconv.groups != dwconv.in_channels:
        raise ValueError(f"proj_ffn: the FFN's conv must be 5x5 depthwise with padding 2, got {dwconv}")
    c = [t.detach().float().contiguous() for t in (proj.bias, norm.weight, norm.bias, fc1.bias, dwconv.bias, fc2.bias)]
    taps = dwconv.weight.detach().float().reshape(dwconv.out_channels, 25).t().contiguous()
    return FFNWeights(panels(proj.weight.detach()), c[0], c[1], c[2], float(norm.eps), panels(fc1.weight.detach()),
                      c[3], taps, c[4], panels(fc2.weight.detach()), c[5])


def _call_ffn(fn, y: torch.Tensor, x: torch.Tensor, w: FFNWeights, threads: int) -> torch.Tensor:
    B, H, W, C = x.shape
    hidden = w.fc1_bias.shape[0]
    if (y.shape != x.shape or w.proj_bias.shape[0] != C or w.proj.numel() != packed_numel(C, C)
            or w.fc1.numel() != packed_numel(hidden, C) or w.fc2.numel() != packed_numel(C, hidden)):
        raise ValueError(f"proj_ffn: maps {tuple(y.shape)} and {tuple(x.shape)} do not fit the weights "
                         f"(C {w.proj_bias.shape[0]}, hidden {hidden})")
    y, x = y.contiguous(), x.contiguous()
    out = torch.empty_like(x)
    rc = fn(y.data_ptr(), x.data_ptr(), out.data_ptr(), B, H, W, C, w.proj.data_ptr(), w.proj_bias.data_ptr(),
            w.norm.data_ptr(), w.norm_bias.data_ptr(), w.eps, w.fc1.data_ptr(), w.fc1_bias.data_ptr(), hidden,
            w.dwconv.data_ptr(), w.dwconv_bias.data_ptr(), w.fc2.data_ptr(), w.fc2_bias.data_ptr(), threads)
    if rc != 0:
        raise RuntimeError("edt_proj_ffn failed (out of memory?)")
    return out


def proj_ffn(y: torch.Tensor, x: torch.Tensor, weights: FFNWeights) -> torch.Tensor:
    """The rest of an EDT block after the attention: ``m = x + proj(y)``, then ``m + fc2(GELU(dwconv(GELU(fc1(
    norm(m))))))``; y and x (B, H, W, C) channels-last."""
    return _call_ffn(library().proj_ffn, y, x, weights, torch.get_num_threads())


def reference_proj_ffn(y: torch.Tensor, x: torch.Tensor, proj, norm, fc1, dwconv, fc2) -> torch.Tensor:
    """The same in PyTorch's ops, layer by layer: what the kernel is checked against."""
    m = x + proj(y)
    h = F.gelu(dwconv(F.gelu(fc1(norm(m))).permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
    return m + fc2(h)


def _check(lib: Kernels) -> None:
    """The kernels against the reference formulations on small maps (the attention: both branches, shifted and not,
    two images; the FFN: widths that are not multiples of 16, a row that is not a multiple of 8 pixels, two
    images): a compiler that miscompiles them must not change a user's output."""
    gen = torch.Generator().manual_seed(0)
    heads, d, window, shape = 2, 3, (2, 4), (2, 8, 8)
    x, norm, wq, bq, lw, lb = _attention_case(gen, shape, 10, heads, d)
    weights = attention_weights(norm, *log2e_rows(wq, bq, heads, d), lw, lb)
    for shift in ((0, 0), (1, 2)):
        with torch.no_grad():
            out = _call(lib.attention, x, weights, window, shift, heads, d, 2)
            ref = reference_block_attention(x, norm, wq, bq, lw, lb, window, shift, heads, d)
        err = (out - ref).abs().max().item()
        if not err <= 1e-4:
            raise RuntimeError(f"the built attention kernel is off by {err:.3g} from the reference")
    y, x, layers = _ffn_case(gen, (2, 5, 11), 12, 40)
    with torch.no_grad():
        out = _call_ffn(lib.proj_ffn, y, x, ffn_weights(*layers), 2)
        err = (out - reference_proj_ffn(y, x, *layers)).abs().max().item()
    if not err <= 1e-4:
        raise RuntimeError(f"the built FFN kernel is off by {err:.3g} from the reference")


def _ffn_case(gen, shape, C, hidden):
    """Random maps and layers (proj, norm, fc1, dwconv, fc2) for checking the FFN kernel."""
    with torch.random.fork_rng(devices=[]):  # the layers' own initialisation must not move the caller's generator
        layers = (torch.nn.Linear(C, C), torch.nn.LayerNorm(C), torch.nn.Linear(C, hidden),
                  torch.nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden), torch.nn.Linear(hidden, C))
    with torch.no_grad():
        for p in (p for m in layers for p in m.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return torch.randn(*shape, C, generator=gen), torch.randn(*shape, C, generator=gen), layers
