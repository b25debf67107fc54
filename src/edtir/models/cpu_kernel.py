"""C kernels for EDT on the CPU, built into one library. For fp32 inference a block is two of them: the norm, the qkv
product and the window attention (``cpu_attention.c``), then ``proj`` with the FFN (``cpu_ffn.c``). For fp32
training two more have autograd functions here: the window attention with its gathers, LePE and their backward
(``cpu_attention_train.c``, :func:`window_attention`) and the FFN's depthwise conv + GELU with theirs
(``cpu_dwconv.c``, :func:`dwconv_gelu`).

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
:func:`status` says which and why. The kernels are written for AVX-512 (16 floats a vector, 32 registers): built
without it (AVX2) they ran 1.9-4.5x slower than the PyTorch path, so where the compiler's ``-march=native`` lacks
AVX-512 they are neither built nor used unless asked for (``EDTIR_CPU_KERNEL=1``, or ``with
cpu_kernel.force(True)``), and then built at -O2 (GCC took 97 s over them at -O3 for AVX2). Every kernel is checked
against the reference formulation (the training ones: their gradients too) once per process before any is used.

There, two kernels built on their own at 8 floats a vector (-O3, under 10 s) take parts of the PyTorch fast path
for fp32 inference instead. The window attention (``cpu_attention8.c``, :func:`window_attention8`): the gather into
windows, q kᵀ, the shift mask, softmax, the product with v, LePE and the scatter back, 8 queries a vector, the head
dim in chunks of 8 channels so that what is held fits AVX2's 16 registers. And the FFN's depthwise conv with its
GELU (``cpu_dwconv8.c``, :func:`dwconv_gelu8`). On a 2-core AVX2 VM they took EDT-T x2 at 264x264 from about 10.4 s
to 4.2-4.6 s and EDT-B x2 at 72x72 from 2.6-3.1 s to 1.8-2.1 s (docs/performance.md). The same library holds the
training kernels' sources built at 8 lanes (``-DLANES=8``; the depthwise conv's forward is ``cpu_dwconv8.c``'s),
which serve training there (:func:`training_library`): an EDT-T step of 8 LR patches of 48 took 4.4 s on that VM
against 12.6 s with torch's fused attention. ``EDTIR_CPU_ATTENTION8=0`` keeps PyTorch's ops, for inference and
training.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
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

SOURCES = tuple(Path(__file__).with_name(n) for n in ("cpu_attention.c", "cpu_ffn.c", "cpu_attention_train.c",
                                                         "cpu_dwconv.c"))
HEADERS = tuple(Path(__file__).with_name(n) for n in ("cpu_vec.h", "cpu_lepe.h"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno")
#: the largest head dim the kernel takes (EDT's are 5, 10 and 15)
MAX_HEAD_DIM = 16
#: the kernel computes softmax with 2^x: q's rows of the qkv weight carry this factor on top of the attention scale
LOG2E = 1.0 / math.log(2.0)

#: EDTIR_CPU_KERNEL=0 in the environment (or ``with cpu_kernel.enabled(False)``) keeps the PyTorch fast path
enabled = Switch("EDTIR_CPU_KERNEL")
#: EDTIR_CPU_KERNEL=1 (or ``with cpu_kernel.force(True)``) serves the kernels where the build lacks AVX-512 too
force = Switch("EDTIR_CPU_KERNEL", default=False)
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


def _flags() -> tuple[str, ...]:
    """:data:`FLAGS` for the AVX-512 build the kernels were tuned on; -O2 for any other target, where they serve
    only when forced and GCC's -O3 spent minutes on their 16-float vector code (AVX2: 97 s, against 18 s at -O2)."""
    if "-march=native" in FLAGS and native_avx512():
        return FLAGS
    return tuple("-O2" if f == "-O3" else f for f in FLAGS)


def _build(sources: tuple[Path, ...] = SOURCES, flags: tuple[str, ...] | None = None,
           stem: str = "cpu_kernels") -> Path:
    """The library of ``sources`` (with :data:`HEADERS`) in the cache, built once per source, flags, compiler and
    CPU."""
    flags = flags or _flags()
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (set CC, or install gcc or clang)")
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    text = [p.read_text() for p in (*sources, *HEADERS)]
    key = hashlib.sha256("\n".join([*text, " ".join(flags), version, _machine()]).encode()).hexdigest()
    path = cache_dir() / f"{stem}-{key[:16]}.so"
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
        run = subprocess.run([*cc, *flags, "-o", tmp, *map(str, sources)], capture_output=True, text=True, timeout=600)
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
    train_forward: Callable  # window attention with autograd (cpu_attention_train.c)
    train_backward: Callable
    dwconv_forward: Callable  # the FFN's depthwise conv + GELU with autograd (cpu_dwconv.c)
    dwconv_backward: Callable


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
    kernels = Kernels(attention, ffn, *_training_entries(lib))
    with _checking():
        _check(kernels)
    return kernels


def _training_entries(lib: ctypes.CDLL) -> tuple[Callable, ...]:
    """The training kernels' entry points (cpu_attention_train.c, cpu_dwconv.c) in a library built with them:
    the attention's forward and backward, the depthwise conv's forward and backward."""
    ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fwd, bwd = lib.edt_window_attention_fwd, lib.edt_window_attention_bwd
    fwd.restype = bwd.restype = i32
    fwd.argtypes = [ptr] * 5 + [i32] * 2 + [ptr] * 2 + [i32] * 2 + [i64] + [i32] * 3 + [i64, i32]
    bwd.argtypes = [ptr] * 6 + [i32] * 2 + [ptr] * 2 + [i32] * 2 + [ptr] * 3 + [i64] + [i32] * 3 + [i64, i32]
    dw_fwd, dw_bwd = lib.edt_dwconv_gelu_fwd, lib.edt_dwconv_gelu_bwd
    dw_fwd.restype = dw_bwd.restype = i32
    dw_fwd.argtypes = [ptr] * 5 + [i32] * 5
    dw_bwd.argtypes = [ptr] * 7 + [i32] * 5
    return fwd, bwd, dw_fwd, dw_bwd


def _checking():
    """Where a library's checks run: loaded mid-training, they must not move the run's random stream; loaded first
    under inference_mode (restore, eval), the training kernels' checks still need autograd."""
    stack = contextlib.ExitStack()
    for c in (torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad()):
        stack.enter_context(c)
    return stack


def library() -> Kernels | None:
    """The kernels, built and checked on first call; None where they cannot serve (see :func:`status`)."""
    if _state["lib"] is None and _state["error"] is None:
        try:
            _state["lib"] = _load()
        except Exception as e:  # no compiler, a failed build, a wrong result: the PyTorch path serves
            _state["error"] = f"{type(e).__name__}: {e}"
    return _state["lib"]


@functools.cache
def native_avx512() -> bool | None:
    """Whether the build (``-march=native``) would have AVX-512, from the compiler's own macros (a few ms, no
    build); None where that cannot be asked (no compiler), so that the build itself reports why."""
    cc = _compiler()
    if cc is None:
        return None
    try:
        run = subprocess.run([*cc, "-march=native", "-dM", "-E", "-x", "c", os.devnull], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return "__AVX512F__" in run.stdout if run.returncode == 0 else None


def wanted() -> bool:
    """On, and for this CPU (AVX-512, or nothing known against it) or forced: then the kernels are built and used."""
    return enabled.on and (force.on or native_avx512() is not False)


def chosen() -> bool:
    """Whether the kernels serve where they can: wanted, built and checked."""
    return wanted() and library() is not None


def status() -> str:
    """One line: whether the C kernel serves on this machine, and why not."""
    if not enabled.on:
        return "off (EDTIR_CPU_KERNEL=0)"
    if not wanted():
        if not attention8.on:
            eight = "its attention in PyTorch (EDTIR_CPU_ATTENTION8=0)"
        elif library8() is not None:
            eight = (f"its attention and depthwise conv in the 8-lane kernels, for inference and training "
                     f"({_state8['path']})")
        else:
            eight = f"its attention in PyTorch (the 8-lane kernels are unavailable: {_state8['error']})"
        return ("not used: no AVX-512 on this CPU, where they are slower than the PyTorch fast path, which serves, "
                f"{eight} (EDTIR_CPU_KERNEL=1 uses them)")
    if library() is not None:
        return f"on ({_state['path']})"
    return f"unavailable ({_state['error']}); using the PyTorch fast path"


def serves(x: torch.Tensor, head_dim: int) -> bool:
    """CPU, float32 (no autocast), no autograd: inference. The caller checks for export and compile."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and head_dim <= MAX_HEAD_DIM
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and chosen())


def serves_training(x: torch.Tensor, head_dim: int = 0) -> bool:
    """The kernels with autograd (:func:`window_attention`, :func:`dwconv_gelu`): CPU, float32, no autocast, not
    exporting or compiling (the callers check for the fast path)."""
    from .edt import exporting

    return (x.device.type == "cpu" and x.dtype == torch.float32 and head_dim <= MAX_HEAD_DIM
            and not torch.is_autocast_enabled("cpu") and not exporting() and not torch.compiler.is_compiling()
            and training_library() is not None)


def training_library():
    """The library whose kernels with autograd serve here: the AVX-512 one where it is chosen; else, where the
    AVX-512 kernels are not wanted, the 8-lane one (the same training sources built at 8 floats a vector); None
    where neither can."""
    if chosen():
        return library()
    if enabled.on and attention8.on and not wanted():
        return library8()
    return None


#: the column width of the kernels' packed weights (4 vectors of 16); the last panel is as narrow as whole vectors allow
PANEL = 64


def _lanes(n: int) -> int:
    """n rounded up to whole vectors of 16 floats."""
    return -(-n // 16) * 16


def _ptr(t: torch.Tensor | None):
    """A tensor's address for the kernels, None (NULL) for no tensor."""
    return None if t is None else t.data_ptr()


def packed_numel(n: int, k: int) -> int:
    """The floats :func:`panels` makes of an (n, k) weight: k rows of n columns rounded up to whole vectors of 16."""
    return k * _lanes(n)


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
    _check_training(lib, gen)
    _check_dwconv(lib, gen)


def _ffn_case(gen, shape, C, hidden):
    """Random maps and layers (proj, norm, fc1, dwconv, fc2) for checking the FFN kernel."""
    with torch.random.fork_rng(devices=[]):  # the layers' own initialisation must not move the caller's generator
        layers = (torch.nn.Linear(C, C), torch.nn.LayerNorm(C), torch.nn.Linear(C, hidden),
                  torch.nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden), torch.nn.Linear(hidden, C))
    with torch.no_grad():
        for p in (p for m in layers for p in m.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return torch.randn(*shape, C, generator=gen), torch.randn(*shape, C, generator=gen), layers


# ---------------------------------------------------------------------------------------------------------------
# Window attention with autograd, for training (cpu_attention_train.c)
# ---------------------------------------------------------------------------------------------------------------

def _base2_padded(b: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, N, N) bias in e-units -> base-2 units, the last axis padded with zeros to whole vectors of 16."""
    return F.pad(b.float() * LOG2E, (0, _lanes(n) - n)).contiguous()


def bias_keys(bias: torch.Tensor, n: int) -> torch.Tensor:
    """A (rows, [1,] N, N) bias in e-units as the kernels' forward reads it: in base-2 units, key-major (the queries
    along the last axis), that axis padded with zeros to whole vectors of 16."""
    return _base2_padded(bias.detach().reshape(-1, n, n).transpose(1, 2), n)


class _WindowAttention(torch.autograd.Function):
    """:func:`window_attention`: the forward keeps each query's log-sum-exp, the backward recomputes the
    probabilities (once, kept in L2 for its second pass) and returns the gradients of the rows and of LePE's weight
    and bias."""

    @staticmethod
    def forward(ctx, rows, lepe_w, lepe_b, bias, plan, lib):
        index, n, bias_from, period, heads, d, (A, B), pair = plan
        hd = heads * d
        nw = rows.shape[0] if index is None else index.numel() // n
        rows = rows.contiguous()
        out = rows.new_empty(nw, n, hd) if index is None else rows.new_empty(index.numel(), hd)
        lse = rows.new_empty(nw, heads, _lanes(n))
        bq = bias_keys(bias, n) if bias is not None else None
        lw, lb = (None, None) if lepe_w is None else (lepe_w.detach().contiguous(), lepe_b.detach().contiguous())
        rc = lib.train_forward(rows.data_ptr(), _ptr(index), out.data_ptr(), lse.data_ptr(), _ptr(bq), bias_from,
                               period or nw, _ptr(lw), _ptr(lb), A, B, nw, n, heads, d, pair,
                               torch.get_num_threads())
        if rc != 0:
            raise RuntimeError("edt_window_attention_fwd failed (out of memory?)")
        ctx.save_for_backward(rows, out, lse)
        ctx.plan = (index, bq, lw, lb, bias_from, period or nw, A, B, nw, n, heads, d, pair, lib)
        return out

    @staticmethod
    def backward(ctx, d_out):
        rows, out, lse = ctx.saved_tensors
        index, bq, lw, lb, bias_from, period, A, B, nw, n, heads, d, pair, lib = ctx.plan
        d_out = d_out.contiguous()
        d_rows = torch.empty_like(rows)
        d_lw, d_lb = (None, None) if lw is None else (torch.empty_like(lw), torch.empty_like(lb))
        rc = lib.train_backward(rows.data_ptr(), _ptr(index), out.data_ptr(), d_out.data_ptr(), lse.data_ptr(),
                                _ptr(bq), bias_from, period, _ptr(lw), _ptr(lb), A, B, d_rows.data_ptr(), _ptr(d_lw),
                                _ptr(d_lb), nw, n, heads, d, pair, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError("edt_window_attention_bwd failed (out of memory?)")
        return d_rows, d_lw, d_lb, None, None, None


def window_attention(rows: torch.Tensor, heads: int, d: int, bias: torch.Tensor | None = None, bias_from: int = 0,
                     period: int | None = None, index: torch.Tensor | None = None, n: int | None = None,
                     lepe: tuple | None = None, lib: Kernels | None = None) -> torch.Tensor:
    """softmax(q kᵀ + bias) v per window and head, with autograd. ``rows`` (windows, N, 3 heads d): per token
    [q | k | v], each [head][d], q multiplied by the attention scale and :data:`LOG2E`; -> (windows, N, heads d).
    ``bias`` ((windows with one, [1,] N, N), in the units of the logits before the LOG2E factor, symmetric or
    not) applies to the windows at positions ``bias_from`` and later within every ``period`` windows, as in
    :func:`edt.windowed_attention`. With ``index`` and ``n`` (rows 2-D, as :func:`window_attention8` takes them)
    the kernel gathers the windows itself and writes each token's output to its own row; there the rows may also
    be a pixel's two (one a branch) side by side and padded, (pixels, 6 heads d + pad) as the qkv projection makes
    them, its output padded to a width the product runs faster at (the padding is not read; its gradient is zero).
    ``lepe`` (weight (2, 9, heads d) tap-major, bias (2, heads d), (A, B)) adds LePE, the gradients flowing to
    both."""
    width, hd = rows.shape[-1], heads * d
    if index is None:
        n = rows.shape[1]
    elif rows.dim() != 2 or index.dtype != torch.int64 or n is None or index.numel() % n:
        raise ValueError("window_attention: index must be int64, (windows * N,), over 2-D rows")
    else:
        index = index.contiguous()
    paired = index is not None and width >= 6 * hd
    if (width != 3 * hd and not paired) or d > MAX_HEAD_DIM:
        raise ValueError(f"window_attention: rows of {width} do not hold q, k, v of {heads} heads of {d}")
    if paired and index.numel() != 2 * rows.shape[0]:
        raise ValueError(f"window_attention: {index.numel()} tokens in the windows, {2 * rows.shape[0]} rows")
    lw, lb, (A, B) = lepe if lepe is not None else (None, None, (0, 0))
    nw = rows.shape[0] if index is None else index.numel() // n
    if lepe is not None and (lw.shape != (2, 9, heads * d) or lb.shape != (2, heads * d) or A * B != n or nw % 2):
        raise ValueError(f"window_attention: LePE weights {tuple(lw.shape)} do not fit {heads} heads of {d} in "
                         f"windows of {n} tokens")
    return _WindowAttention.apply(rows, lw, lb, bias, (index, n, bias_from, period, heads, d, (A, B),
                                                       width if paired else 6 * hd), lib or training_library())


def reference_window_attention_rows(rows, heads: int, d: int, bias=None, bias_from: int = 0, period=None):
    """:func:`window_attention` in PyTorch's ops (any dtype, autograd through them): what the kernel is checked
    against."""
    nw, n, _ = rows.shape
    q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in rows.split(heads * d, dim=-1))
    logits = q @ k.transpose(-1, -2)  # base-2 units (q carries LOG2E)
    if bias is not None:
        period = period or nw
        full = torch.zeros(period, n, n, dtype=rows.dtype)
        full[bias_from:] = bias.reshape(-1, n, n).to(rows.dtype) * LOG2E
        logits = logits + full.repeat(nw // period, 1, 1)[:, None]
    out = torch.softmax(logits * math.log(2.0), dim=-1) @ v
    return out.transpose(1, 2).reshape(nw, n, heads * d)


def _train_case(gen, nw=4, n=15, heads=2, d=3, period=2, bias_from=1):
    """Random rows, a symmetric shift-style bias (0 or -100) for the windows that take one, and an output gradient."""
    rows = torch.randn(nw, n, 3 * heads * d, generator=gen)
    label = torch.randint(0, 3, (period - bias_from, n), generator=gen)
    bias = torch.where(label[:, :, None] == label[:, None, :], 0.0, -100.0)[:, None]
    return rows, bias, torch.randn(nw, n, heads * d, generator=gen), dict(bias_from=bias_from, period=period)


def against_reference(kernel, reference, inputs, grad):
    """A training kernel beside its reference: ``kernel`` on float32 copies of ``inputs``, ``reference`` on float64
    ones, each followed by a backward pass from ``grad``. Returns (output, the reference's output, [(gradient,
    the reference's gradient) for each input])."""
    ours = [t.detach().float().clone().requires_grad_() for t in inputs]
    theirs = [t.detach().double().requires_grad_() for t in inputs]
    out = kernel(*ours)
    out.backward(grad.float())
    ref = reference(*theirs)
    ref.backward(grad.double())
    return out, ref, [(a.grad, r.grad) for a, r in zip(ours, theirs, strict=True)]


def _max_error(out, ref, grads) -> float:
    return max((a - b).abs().max().item() for a, b in [(out, ref), *grads])


def _check_training(lib, gen) -> None:
    """The training kernel's output and gradients against autograd through the reference, in float64: rows in
    window order, and gathered with LePE (the gradients of its weight and bias too)."""
    rows, bias, grad, plan = _train_case(gen)
    nw, n, width = rows.shape
    gathered = dict(index=torch.randperm(nw * n, generator=gen), n=n, **plan)
    lepe = [torch.randn(2, 9, 6, generator=gen), torch.randn(2, 6, generator=gen)]
    for kernel, reference, inputs, g in (
            (lambda x: window_attention(x, 2, 3, bias, **plan, lib=lib),
             lambda x: reference_window_attention_rows(x, 2, 3, bias, **plan), [rows], grad),
            (lambda x, w, b: window_attention(x, 2, 3, bias, **gathered, lepe=(w, b, (3, 5)), lib=lib),
             lambda x, w, b: reference_window_attention8(x, 2, 3, bias, **gathered, lepe=(w, b, (3, 5))),
             [rows.view(-1, width), *lepe], grad.view(-1, 6))):
        err = _max_error(*against_reference(kernel, reference, inputs, g))
        if not err <= 1e-4:
            raise RuntimeError(f"the built training attention kernel is off by {err:.3g} from the reference")


# ---------------------------------------------------------------------------------------------------------------
# The FFN's depthwise conv + GELU with autograd, for training (cpu_dwconv.c)
# ---------------------------------------------------------------------------------------------------------------

class _DWConvGELU(torch.autograd.Function):
    """:func:`dwconv_gelu`: keeps the input and the conv's output (before GELU) for the backward."""

    @staticmethod
    def forward(ctx, h, weight, bias, lib):
        B, H, W, C = h.shape
        if tuple(weight.shape) != (C, 1, 5, 5) or tuple(bias.shape) != (C,):
            raise ValueError(f"dwconv_gelu: a 5x5 depthwise weight of {C} channels expected, got "
                             f"{tuple(weight.shape)}")
        h = h.contiguous()
        taps = weight.detach().reshape(C, 25).t().contiguous()
        z, y = torch.empty_like(h), torch.empty_like(h)
        rc = lib.dwconv_forward(h.data_ptr(), taps.data_ptr(), bias.detach().contiguous().data_ptr(), z.data_ptr(),
                                y.data_ptr(), B, H, W, C, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError("edt_dwconv_gelu_fwd failed (out of memory?)")
        ctx.save_for_backward(h, z, taps)
        ctx.lib = lib
        return y

    @staticmethod
    def backward(ctx, gy):
        h, z, taps = ctx.saved_tensors
        B, H, W, C = h.shape
        gy = gy.contiguous()
        gh, gw, gb = torch.empty_like(h), torch.empty_like(taps), h.new_empty(C)
        rc = ctx.lib.dwconv_backward(h.data_ptr(), z.data_ptr(), gy.data_ptr(), taps.data_ptr(), gh.data_ptr(),
                                     gw.data_ptr(), gb.data_ptr(), B, H, W, C, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError("edt_dwconv_gelu_bwd failed (out of memory?)")
        return gh, gw.t().reshape(C, 1, 5, 5), gb, None


def dwconv_gelu(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lib: Kernels | None = None):
    """GELU(depthwise 5x5 conv of h, zero padding 2) with autograd; h (B, H, W, C) channels-last, weight (C, 1, 5,
    5) and bias (C) as ``nn.Conv2d`` holds them; -> (B, H, W, C)."""
    return _DWConvGELU.apply(h, weight, bias, lib or training_library())


def reference_dwconv_gelu(h, weight, bias):
    """:func:`dwconv_gelu` in PyTorch's ops (any dtype, autograd through them)."""
    return F.gelu(F.conv2d(h.permute(0, 3, 1, 2), weight, bias, padding=2, groups=h.shape[-1])).permute(0, 2, 3, 1)


def _dwconv_case(gen, shape=(2, 5, 7), C=20):
    """A random map, weight, bias and output gradient for checking the depthwise kernel."""
    return (torch.randn(*shape, C, generator=gen), torch.randn(C, 1, 5, 5, generator=gen) * 0.3,
            torch.randn(C, generator=gen) * 0.3, torch.randn(*shape, C, generator=gen))


def _check_dwconv(lib: Kernels, gen) -> None:
    """The depthwise kernel's output and gradients against autograd through the reference, in float64."""
    h, w, b, g = _dwconv_case(gen)
    err = _max_error(*against_reference(lambda *t: dwconv_gelu(*t, lib=lib), reference_dwconv_gelu, [h, w, b], g))
    if not err <= 1e-4:
        raise RuntimeError(f"the built depthwise conv kernel is off by {err:.3g} from the reference")


# ---------------------------------------------------------------------------------------------------------------
# Window attention at 8 lanes, for inference where the kernels above are not used (cpu_attention8.c)
# ---------------------------------------------------------------------------------------------------------------

#: the inference kernels written for 8 lanes, and the training kernels built at 8 lanes (``-DLANES=8``)
SOURCES8 = tuple(Path(__file__).with_name(n) for n in ("cpu_attention8.c", "cpu_dwconv8.c", "cpu_attention_train.c",
                                                          "cpu_dwconv.c"))
FLAGS8 = (*FLAGS, "-DLANES=8")
#: EDTIR_CPU_ATTENTION8=0 (or ``with cpu_kernel.attention8(False)``) keeps PyTorch's ops there (the name is the
#: first kernel's; it switches both)
attention8 = Switch("EDTIR_CPU_ATTENTION8")
_state8: dict = {"lib": None, "error": None, "path": None}


class Kernels8(NamedTuple):
    """The 8-lane library's entry points; the training ones as :class:`Kernels` names them."""
    attention: Callable  # window attention with the gathers and LePE (cpu_attention8.c)
    dwconv_gelu: Callable  # the FFN's depthwise conv + GELU (cpu_dwconv8.c)
    train_forward: Callable  # window attention with autograd (cpu_attention_train.c at 8 lanes)
    train_backward: Callable
    dwconv_forward: Callable  # the FFN's depthwise conv + GELU with autograd: cpu_dwconv8.c's, z kept
    dwconv_backward: Callable  # cpu_dwconv.c's at 8 lanes


def _load8() -> Kernels8:
    path = _build(SOURCES8, FLAGS8, "cpu_kernels8")
    lib = ctypes.CDLL(str(path))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    attention, dwconv = lib.edt_window_attention8, lib.edt_dwconv_gelu8
    attention.restype = dwconv.restype = i32
    attention.argtypes = [ptr] * 4 + [i32] * 3 + [ptr] * 2 + [i32] * 2 + [ctypes.c_int64] + [i32] * 4
    dwconv.argtypes = [ptr] * 5 + [i32] * 5
    _state8["path"] = path
    fwd, bwd, _, dw_bwd = _training_entries(lib)
    # the depthwise conv's forward: this library's own kernel, which takes the training one's arguments (z kept)
    # and runs faster than cpu_dwconv.c's forward built at 8 lanes (whose 25 weights no longer fit in registers)
    kernels = Kernels8(attention, dwconv, fwd, bwd, dwconv, dw_bwd)
    with _checking():
        _check8(kernels)
    return kernels


def _check8(lib: Kernels8) -> None:
    """The 8-lane kernels against the references in float64 (the attention: one chunk of channels and two, 15
    tokens, rows in order and gathered with LePE; the depthwise conv: 12 channels, rows of 13 pixels, two images;
    the training kernels as :func:`_check` checks them, gradients included): a compiler that miscompiles them must
    not change a user's output."""
    gen = torch.Generator().manual_seed(0)
    h, w, b, _ = _dwconv_case(gen, (2, 9, 13), 12)
    with torch.no_grad():
        err = (dwconv_gelu8(h, w, b, fn=lib.dwconv_gelu) - reference_dwconv_gelu(h.double(), w.double(), b.double())
               ).abs().max().item()
    if not err <= 1e-4:
        raise RuntimeError(f"the built 8-lane depthwise conv kernel is off by {err:.3g} from the reference")
    for d, lepe in ((3, False), (11, True)):  # one chunk of channels and two; rows in order, and gathered with LePE
        rows, bias, _, plan = _train_case(gen, d=d)
        nw, n, width = rows.shape
        args = {}
        if lepe:
            args = dict(index=torch.randperm(nw * n, generator=gen), n=n,
                        lepe=(torch.randn(2, 9, 2 * d, generator=gen), torch.randn(2, 2 * d, generator=gen), (3, 5)))
            rows = rows.view(-1, width)
        with torch.no_grad():
            out = window_attention8(rows, 2, d, bias_keys(bias, n), **plan, **args, fn=lib.attention)
        err = (out - reference_window_attention8(rows.double(), 2, d, bias, **plan, **args)).abs().max().item()
        if not err <= 1e-4:
            raise RuntimeError(f"the built 8-lane attention kernel is off by {err:.3g} from the reference")
    _check_training(lib, gen)
    _check_dwconv(lib, gen)


def library8() -> Kernels8 | None:
    """The 8-lane kernels, built (-O3, under 10 s) and checked on first call; None where they cannot serve."""
    if _state8["lib"] is None and _state8["error"] is None:
        try:
            _state8["lib"] = _load8()
        except Exception as e:  # no compiler, a failed build, a wrong result: PyTorch's attention serves
            _state8["error"] = f"{type(e).__name__}: {e}"
    return _state8["lib"]


def serves8(x: torch.Tensor, head_dim: int = 0) -> bool:
    """Inference on the CPU in float32, not exporting or compiling, where the AVX-512 kernels are not wanted (the
    caller checks for the fast path): the window attention goes to :func:`window_attention8`, the FFN's depthwise
    conv and GELU to :func:`dwconv_gelu8`."""
    from .edt import exporting

    return (enabled.on and attention8.on and x.device.type == "cpu" and x.dtype == torch.float32
            and head_dim <= MAX_HEAD_DIM and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not exporting() and not torch.compiler.is_compiling() and not wanted() and library8() is not None)


def window_attention8(rows: torch.Tensor, heads: int, d: int, keys: torch.Tensor | None = None, bias_from: int = 0,
                      period: int | None = None, index: torch.Tensor | None = None, n: int | None = None,
                      lepe: tuple | None = None, fn: Callable | None = None) -> torch.Tensor:
    """softmax(q kᵀ + bias) v per window and head, without autograd, 8 queries a vector (AVX2). ``rows`` (windows,
    N, 3 heads d) as :func:`window_attention` takes them (q multiplied by the scale and :data:`LOG2E`), or 2-D
    with ``index`` (windows * N,) naming the row of each token of each window and ``n`` = N: the kernel gathers
    them itself, and writes each token's output to the row it came from. ``keys``: the bias as :func:`bias_keys`
    lays it out, for the windows at positions ``bias_from`` and later within every ``period``. ``lepe``: (weight
    (2, 9, heads d) tap-major, bias (2, heads d), (A, B)): adds LePE, the 3x3 depthwise conv of v inside each A x B
    window, window w taking branch w % 2's kernel.
    -> (windows, N, heads d), or with ``index`` (windows * N, heads d) in the rows' order."""
    width = rows.shape[-1]
    if index is None:
        nw, n = rows.shape[:2]
    else:
        nw = index.numel() // n
        if rows.dim() != 2 or index.dtype != torch.int64 or index.numel() != nw * n:
            raise ValueError("window_attention8: index must be int64, (windows * N,), over 2-D rows")
        index = index.contiguous()
    if width != 3 * heads * d or d > MAX_HEAD_DIM:
        raise ValueError(f"window_attention8: rows of {width} do not hold q, k, v of {heads} heads of {d}")
    if keys is not None and (keys.dtype != torch.float32 or keys.shape[1:] != (n, _lanes(n))):
        raise ValueError(f"window_attention8: a bias of {tuple(keys.shape)} does not fit windows of {n} tokens")
    lw, lb, (A, B) = lepe if lepe is not None else (None, None, (0, 0))
    if lepe is not None and (lw.shape != (2, 9, heads * d) or lb.shape != (2, heads * d) or A * B != n or nw % 2):
        raise ValueError(f"window_attention8: LePE weights {tuple(lw.shape)} do not fit {heads} heads of {d} in "
                         f"windows of {n} tokens")
    rows = rows.contiguous()
    lw, lb = (None, None) if lepe is None else (lw.float().contiguous(), lb.float().contiguous())
    out = rows.new_empty(nw, n, heads * d) if index is None else rows.new_empty(nw * n, heads * d)
    rc = (fn or library8().attention)(rows.data_ptr(), _ptr(index), out.data_ptr(), _ptr(keys), _lanes(n), bias_from,
                            period or nw, _ptr(lw), _ptr(lb), A, B, nw, n, heads, d, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError("edt_window_attention8 failed (out of memory?)")
    return out


def dwconv_gelu8(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, fn: Callable | None = None):
    """GELU(depthwise 5x5 conv of h, zero padding 2) without autograd, 8 channels a vector (AVX2); h (B, H, W, C)
    channels-last, weight (C, 1, 5, 5) and bias (C) as ``nn.Conv2d`` holds them; -> (B, H, W, C). What
    :func:`dwconv_gelu` computes for training."""
    B, H, W, C = h.shape
    if tuple(weight.shape) != (C, 1, 5, 5) or tuple(bias.shape) != (C,):
        raise ValueError(f"dwconv_gelu8: a 5x5 depthwise weight of {C} channels expected, got {tuple(weight.shape)}")
    h = h.contiguous()
    taps = weight.detach().float().reshape(C, 25).t().contiguous()
    bias = bias.detach().float().contiguous()
    y = torch.empty_like(h)
    rc = (fn or library8().dwconv_gelu)(h.data_ptr(), taps.data_ptr(), bias.data_ptr(), None, y.data_ptr(), B, H, W,
                                        C, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError("edt_dwconv_gelu8 failed")
    return y


def reference_window_attention8(rows, heads: int, d: int, bias=None, bias_from: int = 0, period=None, index=None,
                                n: int | None = None, lepe=None) -> torch.Tensor:
    """:func:`window_attention8` in PyTorch's ops (``bias`` as :func:`window_attention` takes it, not laid out)."""
    if index is not None:
        out = reference_window_attention8(rows[index].view(-1, n, rows.shape[-1]), heads, d, bias, bias_from, period,
                                          lepe=lepe)
        return out.reshape(-1, out.shape[-1]).index_copy(0, index, out.reshape(-1, out.shape[-1]))
    out = reference_window_attention_rows(rows, heads, d, bias, bias_from, period)
    if lepe is not None:
        w, b, (A, B) = lepe
        nw, n, hd = out.shape
        v = rows[..., 2 * hd:].reshape(nw // 2, 2, n, hd).transpose(2, 3).reshape(nw // 2, 2 * hd, A, B)
        conv = F.conv2d(v, w.to(v.dtype).transpose(1, 2).reshape(2 * hd, 1, 3, 3), b.to(v.dtype).reshape(-1),
                        padding=1, groups=2 * hd)
        out = out + conv.reshape(nw // 2, 2, hd, n).permute(0, 1, 3, 2).reshape(nw, n, hd)
    return out
