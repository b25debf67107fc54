"""EDT's window attention for fp32 inference on the CPU as one C kernel (``cpu_attention.c``).

On a 2-core VM the eager fast path spent most of an EDT-T pass, and a third of an EDT-B one, in the attention:
batched products of 144 x 144 logits, softmax passes over them and the gathers around them
(docs/performance.md). The C kernel does one (window, branch, head) at a time with the logits in L1, 16 queries
per vector so that softmax needs no horizontal reduction, reads q, k and v straight from the qkv projection's map
(roll, window partition and shift mask are index arithmetic) and writes ``proj``'s input with LePE added.

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
from pathlib import Path

import torch

from .switch import Switch

SOURCE = Path(__file__).with_name("cpu_attention.c")
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
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), version, _machine()]).encode()).hexdigest()
    path = cache_dir() / f"cpu_attention-{key[:16]}.so"
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
        run = subprocess.run([*cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeError(f"{Path(cc[0]).name} failed: {last[:200]}")
        os.replace(tmp, path)  # atomic: another process building the same key at once is harmless
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return path


def _load():
    path = _build()
    lib = ctypes.CDLL(str(path))
    fn = lib.edt_window_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 10
    _state["path"] = path
    _check(fn)
    return fn


def library():
    """The kernel's entry point, built and checked on first call; None where it cannot serve (see :func:`status`)."""
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


def _call(fn, qkv, shape, window, shift, heads, head_dim, lepe_weight, lepe_bias, threads) -> torch.Tensor:
    B, H, W = shape
    wh, ww = window
    if qkv.shape[-1] != 6 * heads * head_dim or H % wh or W % ww or H % ww or W % wh:
        raise ValueError(f"window_attention: qkv {tuple(qkv.shape)} or map {H}x{W} does not fit window {window}")
    qkv = qkv.contiguous()
    lepe_weight, lepe_bias = lepe_weight.float().contiguous(), lepe_bias.float().contiguous()
    out = qkv.new_empty(B, H, W, 2 * heads * head_dim)
    rc = fn(qkv.data_ptr(), out.data_ptr(), lepe_weight.data_ptr(), lepe_bias.data_ptr(), B, H, W, wh, ww,
            shift[0], shift[1], heads, head_dim, threads)
    if rc != 0:
        raise RuntimeError("edt_window_attention failed (out of memory?)")
    return out


def window_attention(qkv: torch.Tensor, shape, window: tuple[int, int], shift: tuple[int, int], heads: int,
                     head_dim: int, lepe_weight: torch.Tensor, lepe_bias: torch.Tensor) -> torch.Tensor:
    """Both branches of an EDT block's attention with LePE: (B, H, W, 2 * 3 * heads * head_dim) qkv, per pixel
    [branch][q, k, v][head][dim] with q multiplied by the attention scale and :data:`LOG2E` (see
    :meth:`edt.EDTBlock.qkv_weight`) -> (B, H, W, 2 * heads * head_dim), [horizontal | vertical] as ``proj`` reads
    it. ``window`` is the horizontal branch's (the vertical one is its transpose), ``shift`` its roll ((0, 0) when
    not shifted); ``lepe_weight`` (2 * heads * head_dim, 9) holds both branches' 3x3 kernels, each in its own
    window's frame (:func:`kernels.lepe_weights`)."""
    return _call(library(), qkv, shape, window, shift, heads, head_dim, lepe_weight, lepe_bias,
                 torch.get_num_threads())


def _check(fn) -> None:
    """The kernel against the reference formulation on a small map, both branches, shifted and not: a compiler
    that miscompiles it must not change a user's output."""
    from .kernels import reference_window_attention

    gen = torch.Generator().manual_seed(0)
    heads, d, window, (B, H, W) = 2, 3, (2, 4), (1, 8, 8)
    qkv = torch.randn(B, H, W, 2, 3, heads, d, generator=gen)
    lw, lb = torch.randn(2 * heads * d, 9, generator=gen), torch.randn(2 * heads * d, generator=gen)
    for shift in ((0, 0), (1, 2)):
        out = _call(fn, qkv.reshape(B, H, W, -1), (B, H, W), window, shift, heads, d, lw, lb, 2)
        ref_qkv = qkv.clone()
        ref_qkv[..., 0, :, :] *= 1.0 / LOG2E  # the reference's softmax is e^x
        ref = reference_window_attention(ref_qkv.reshape(B, H, W, -1), (B, H, W), window, shift, heads, d, lw, lb,
                                         pad=d)
        err = (out - ref).abs().max().item()
        if not err <= 1e-4:
            raise RuntimeError(f"the built kernel is off by {err:.3g} from the reference")
