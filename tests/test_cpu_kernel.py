"""The C kernels of edtir.models.cpu_kernel (for inference: the window attention, and proj with the FFN; for
training: the window attention with its backward) against the reference formulations, in the model, and what happens
where they cannot be built."""

import contextlib
import ctypes
import math
import platform

import pytest
import torch
import torch.nn.functional as F
from test_fast_paths import TOL, sharpen, small_b, small_t

from edtir.models import cpu_kernel, edt
from edtir.models.edt import reference_mode

built = pytest.mark.skipif(cpu_kernel.library() is None, reason=f"the C kernel: {cpu_kernel.status()}")


@pytest.fixture(autouse=True)
def forced():
    """These tests are about the kernels serving: on a CPU without AVX-512, where they are neither built nor used by
    default (slower there), they are forced on so that the same tests run everywhere."""
    with cpu_kernel.force(True):
        yield


CASES = [  # (B, H, W), window, shift, heads, head dim, channels
    ((1, 24, 48), (6, 24), (3, 12), 6, 15, 180),  # EDT-B's heads and width, shifted
    ((2, 48, 24), (6, 24), (3, 12), 6, 5, 60),    # EDT-T's, batch 2, taller than wide
    ((1, 24, 24), (6, 24), (0, 0), 6, 10, 120),   # EDT-S's, not shifted
    ((1, 12, 12), (4, 6), (2, 3), 2, 16, 20),     # 24 tokens: a window that is not a multiple of 16 queries
    ((1, 15, 15), (3, 5), (1, 2), 1, 1, 3),       # 15 tokens, head dim 1, 3 channels
    ((1, 8, 8), (8, 8), (4, 4), 3, 7, 33),        # a square window, widths that are not multiples of 16
]


def run_attention(fn, case, threads, gain=1.0, seed=0):
    """The kernel ``fn`` and the reference (PyTorch's norm and product, then the reference attention) on a random
    input and weights."""
    shape, window, shift, heads, d, C = case
    x, norm, wq, bq, lw, lb = cpu_kernel._attention_case(torch.Generator().manual_seed(seed), shape, C, heads, d,
                                                         gain)
    with torch.no_grad():
        w = cpu_kernel.attention_weights(norm, *cpu_kernel.log2e_rows(wq, bq, heads, d), lw, lb)
        out = cpu_kernel._call(fn, x, w, window, shift, heads, d, threads)
        ref = cpu_kernel.reference_block_attention(x, norm, wq, bq, lw, lb, window, shift, heads, d)
        unmasked = cpu_kernel.reference_block_attention(x, norm, wq, bq, lw, lb, window, (0, 0), heads, d)
    return out, ref, unmasked


@built
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}x{c[4]}-C{c[5]}")
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_reference(case, threads):
    out, ref, _ = run_attention(cpu_kernel.library().attention, case, threads, seed=sum(case[0]) + case[4])
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= TOL


@built
def test_kernel_masks_across_shift_regions():
    """Peaked logits (large q and k): a token attending across a shift-region border would change the output by
    far more than the tolerance, so a wrong mask or label cannot pass."""
    case = ((1, 12, 24), (6, 12), (3, 6), 2, 8, 32)
    out, ref, unmasked = run_attention(cpu_kernel.library().attention, case, 1, gain=3.0, seed=1)
    assert (out - ref).abs().max() <= TOL
    assert (unmasked - ref).abs().max() > 100 * TOL  # the test can tell


@built
def test_kernel_rejects_what_it_does_not_tile():
    x = torch.zeros(1, 12, 12, 16)
    w = cpu_kernel.attention_weights(torch.nn.LayerNorm(16), torch.zeros(2 * 3 * 8, 16), torch.zeros(48),
                                     torch.zeros(16, 9), torch.zeros(16))
    with pytest.raises(ValueError, match="does not fit window"):
        cpu_kernel.block_attention(x, w, (5, 12), (0, 0), 2, 4)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernel.block_attention(x, w, (6, 12), (0, 0), 2, 3)


@built
@pytest.mark.parametrize("make", [small_t, small_b], ids=["EDT-T", "EDT-B-like"])
def test_model_with_the_kernel_equals_reference(make, monkeypatch):
    calls = []
    real = cpu_kernel.block_attention
    monkeypatch.setattr(cpu_kernel, "block_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast_equals_reference(make, calls, seed=2, batch=1)
    assert calls  # the fast path used it


def fast_equals_reference(make, calls: list, seed: int, batch: int):
    """A sharpened model of ``make`` for sr-x2 and denoise-25: each task's fast output equals the reference path's,
    and the reference path adds nothing to ``calls`` (the watched kernel's); returns the model."""
    model = sharpen(make(("sr-x2", "denoise-25"))).eval()
    g = torch.Generator().manual_seed(seed)
    inputs = {"sr-x2": torch.rand(batch, 3, 48, 72, generator=g), "denoise-25": torch.rand(1, 3, 96, 96, generator=g)}
    with torch.inference_mode():
        for task, x in inputs.items():
            fast = model(x, task=task)
            n = len(calls)
            with reference_mode():
                ref = model(x, task=task)
            assert len(calls) == n  # the reference path does not use it
            assert (fast - ref).abs().max() <= TOL
    return model


@built
def test_kernel_serves_inference_only():
    x = torch.zeros(1, 4, 4, 8)
    with torch.no_grad():
        assert cpu_kernel.serves(x, 15)
        assert not cpu_kernel.serves(x, 17)  # wider heads: the PyTorch path
        assert not cpu_kernel.serves(x.double(), 15)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu_kernel.serves(x, 15)
        with cpu_kernel.enabled(False):
            assert not cpu_kernel.serves(x, 15)
    assert not cpu_kernel.serves(x, 15)  # autograd on: training keeps the PyTorch path


@built
def test_without_avx512_the_kernels_serve_only_when_forced(monkeypatch):
    """Built without AVX-512 (AVX2), the kernels ran slower than the PyTorch path (docs/performance.md): there
    they are neither built nor used unless asked for (training takes the 8-lane library's build of the training
    kernels), and a forced build is -O2 (GCC's -O3 took minutes over them); with AVX-512 they serve by default,
    built at -O3."""
    x = torch.zeros(1, 4, 4, 8)
    cpu_kernel.library()  # built (forced here) before the CPU is faked
    for avx512 in (False, True):
        monkeypatch.setattr(cpu_kernel, "native_avx512", lambda a=avx512: a)
        with torch.no_grad(), cpu_kernel.force(False):
            assert cpu_kernel.serves(x, 15) == avx512
            # training: these kernels' own build, or the same sources' 8-lane build
            assert cpu_kernel.training_library() is (cpu_kernel.library() if avx512 else cpu_kernel.library8())
            assert cpu_kernel.status().startswith("on" if avx512 else "not used: no AVX-512 on this CPU")
        with torch.no_grad(), cpu_kernel.force(True):
            assert cpu_kernel.serves(x, 15) and cpu_kernel.status().startswith("on")
        assert ("-O3" in cpu_kernel._flags()) == avx512 and ("-O2" in cpu_kernel._flags()) != avx512
    monkeypatch.setattr(cpu_kernel, "native_avx512", lambda: False)
    monkeypatch.setattr(cpu_kernel, "_state", {"lib": None, "error": None, "path": None})
    with cpu_kernel.force(False):
        assert not cpu_kernel.serves(x, 15) and cpu_kernel._state["lib"] is None  # not built either
    monkeypatch.setenv("EDTIR_CPU_KERNEL", "1")
    assert cpu_kernel.Switch("EDTIR_CPU_KERNEL", default=False).on  # the variable that forces them
    monkeypatch.delenv("EDTIR_CPU_KERNEL")
    assert not cpu_kernel.Switch("EDTIR_CPU_KERNEL", default=False).on


def test_the_avx512_probe_agrees_with_the_cpu():
    """The probe asks the compiler what -march=native means; on Linux /proc/cpuinfo's flags (as the library's cache
    key reads them) say the same."""
    machine = cpu_kernel._machine()
    if "flags" not in machine or cpu_kernel.native_avx512() is None:
        pytest.skip("needs Linux's /proc/cpuinfo and a C compiler")
    assert cpu_kernel.native_avx512() == (" avx512f" in machine)


@built
def test_library_is_built_once_per_source_and_machine(tmp_path, monkeypatch):
    """(The 8-lane library: the same code builds both.)"""
    monkeypatch.setenv("EDTIR_CACHE_DIR", str(tmp_path))
    first = cpu_kernel._build(cpu_kernel.SOURCES8, cpu_kernel.FLAGS8, "cpu_kernels8")
    stamp = first.stat().st_mtime_ns
    assert cpu_kernel._build(cpu_kernel.SOURCES8, cpu_kernel.FLAGS8, "cpu_kernels8") == first  # reused, not rebuilt
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left


@pytest.mark.parametrize("cc", ["missing", "false"], ids=["no compiler", "a failing compiler"])
def test_without_a_compiler_the_pytorch_path_serves(cc, tmp_path, monkeypatch):
    monkeypatch.setenv("EDTIR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler") if cc == "missing" else "false")
    monkeypatch.setattr(cpu_kernel, "_state", {"lib": None, "error": None, "path": None})
    assert cpu_kernel.library() is None
    assert "unavailable" in cpu_kernel.status()
    model = small_t().eval()
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fast = model(x)
        with reference_mode():
            ref = model(x)
    assert (fast - ref).abs().max() <= TOL
    assert not list(tmp_path.iterdir())


def _writes_pi(n):
    """A stand-in for a miscompiled kernel: it fills its output (the argument after the inputs) with pi."""
    def wrong(*args):
        out = args[1] if n == ATTENTION_CHECK_OUT else args[2]
        (ctypes.c_float * n).from_address(out)[:] = [math.pi] * n
        return 0
    return wrong


ATTENTION_CHECK_OUT = 2 * 8 * 8 * 2 * 2 * 3  # the check's attention output: 2 images of 8x8, 2 branches, 2 heads of 3
FFN_CHECK_OUT = 2 * 5 * 11 * 12  # its FFN output: 2 images of 5x11, 12 channels


@built
@pytest.mark.parametrize("which", ["attention", "proj_ffn"])
def test_a_miscompiled_kernel_is_not_used(which):
    """The check against the reference on load: a library where either kernel computes something else is refused."""
    good = cpu_kernel.library()
    lib = good._replace(**{which: _writes_pi(ATTENTION_CHECK_OUT if which == "attention" else FFN_CHECK_OUT)})
    with pytest.raises(RuntimeError, match=f"{'attention' if which == 'attention' else 'FFN'} kernel is off by"):
        cpu_kernel._check(lib)
    cpu_kernel._check(good)  # and the real one passes


FFN_CASES = [  # (B, H, W), C, hidden
    ((1, 24, 48), 60, 120),   # EDT-T's widths
    ((1, 12, 24), 180, 360),  # EDT-B's
    ((2, 7, 13), 12, 40),     # two images, rows of 13 pixels (not a multiple of 8), widths not multiples of 16
    ((1, 1, 5), 16, 16),      # a single row: every tap above and below is outside the map
    ((1, 3, 2), 8, 24),       # a map smaller than the halos, two pixels a row
    ((1, 26, 9), 24, 48),     # 3 threads of at least 8 rows: bands of 8, 9 and 9 rows with their halos
]


@built
@pytest.mark.parametrize("shape,C,hidden", FFN_CASES)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ffn_kernel_equals_reference(shape, C, hidden, threads):
    g = torch.Generator().manual_seed(sum(shape) + C + hidden)
    y, x, layers = cpu_kernel._ffn_case(g, shape, C, hidden)
    with torch.no_grad():
        out = cpu_kernel._call_ffn(cpu_kernel.library().proj_ffn, y, x, cpu_kernel.ffn_weights(*layers), threads)
        ref = cpu_kernel.reference_proj_ffn(y, x, *layers)
        # the test can tell: without the depthwise conv's neighbours (a 1x1 kernel of its centre taps) it is far off
        centre = torch.nn.Conv2d(hidden, hidden, 1, groups=hidden)
        centre.weight.copy_(layers[3].weight[:, :, 2:3, 2:3])
        centre.bias.copy_(layers[3].bias)
        local = cpu_kernel.reference_proj_ffn(y, x, *layers[:3], centre, layers[4])
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= TOL * max(1.0, ref.abs().max().item() / 10)
    if shape[1] * shape[2] > 1:
        assert (local - ref).abs().max() > 100 * TOL


@built
def test_ffn_kernel_gelu_is_erf_gelu():
    """The kernel's GELU on values from about -10 to 10 (proj, fc1 and fc2 identities, the conv's centre tap 1, the
    norm's gain 6): PyTorch's exact (erf) GELU, which the tanh form is not."""
    C = hidden = 16
    v = torch.linspace(-1, 1, 256 * C).view(1, 256, 1, C) ** 3 + torch.linspace(0, 1, C)
    proj, fc1, fc2 = torch.nn.Linear(C, C), torch.nn.Linear(C, hidden), torch.nn.Linear(hidden, C)
    norm, dw = torch.nn.LayerNorm(C), torch.nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden)
    with torch.no_grad():
        for lin in (proj, fc1, fc2):
            lin.weight.copy_(torch.eye(C))
            lin.bias.zero_()
        norm.weight.fill_(6.0)
        dw.weight.zero_()
        dw.weight[:, :, 2, 2] = 1.0
        dw.bias.zero_()
        x = torch.zeros_like(v)
        out = cpu_kernel.proj_ffn(v, x, cpu_kernel.ffn_weights(proj, norm, fc1, dw, fc2))
        ref = cpu_kernel.reference_proj_ffn(v, x, proj, norm, fc1, dw, fc2)
        h = norm(v)
        tanh_form = v + F.gelu(F.gelu(h, approximate="tanh"), approximate="tanh")
    assert h.min() < -8 and h.max() > 8  # the range the test claims
    assert ((out - ref).abs() / ref.abs().clamp(min=1)).max() <= 5e-6  # relative beyond 1 (the norm rounds too)
    assert (tanh_form - ref).abs().max() > 1e-4  # the test can tell erf from the tanh form


@built
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"], ids=["AVX2", "SSE2"])
def test_kernel_without_avx512_equals_reference(march, tmp_path, monkeypatch):
    """The portable paths (no AVX-512: the exponential's, the maximum's, the masked loads' and the reciprocal's
    generic forms) of both kernels on a CPU that has AVX-512, by building for an older instruction set. (On an AVX2
    CPU the forced native build that the other tests use is the AVX2 case already.)"""
    if march == "x86-64-v3" and cpu_kernel.native_avx512() is False:
        pytest.skip("this CPU's own build is the AVX2 one, tested throughout this file")
    monkeypatch.setenv("EDTIR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "FLAGS", tuple(f"-march={march}" if f == "-march=native" else f
                                                   for f in cpu_kernel.FLAGS))
    monkeypatch.setattr(cpu_kernel, "_state", {"lib": None, "error": None, "path": None})
    lib = cpu_kernel._load()  # builds, loads and checks both kernels against the reference (raises if off)
    out, ref, _ = run_attention(lib.attention, CASES[0], 2, seed=5)
    assert (out - ref).abs().max() <= TOL
    g = torch.Generator().manual_seed(5)
    y, x, layers = cpu_kernel._ffn_case(g, (1, 9, 27), 60, 120)
    with torch.no_grad():
        out = cpu_kernel._call_ffn(lib.proj_ffn, y, x, cpu_kernel.ffn_weights(*layers), 2)
        assert (out - cpu_kernel.reference_proj_ffn(y, x, *layers)).abs().max() <= TOL


@built
def test_a_hooked_layer_inside_a_block_is_still_called(monkeypatch):
    """The kernels skip the block's layers (norm2, proj, the FFN's): a block with a hook on one of them takes the
    op-by-op path, so the hook sees its tensor (CKA's feature capture hooks norm2), and the output is the same."""
    model = small_t().eval()
    blk = model.body.layers[0].residual_group.blocks[1]
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    calls, seen = [], []
    real = cpu_kernel.proj_ffn
    monkeypatch.setattr(cpu_kernel, "proj_ffn", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.inference_mode():
        fused = model(x)
        n = len(calls)
        handle = blk.norm2.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].shape))
        try:
            hooked = model(x)
        finally:
            handle.remove()
    assert n > 0 and len(calls) == 2 * n - 1  # every block but the hooked one took the kernels
    assert seen == [(1, 24, 24, 60)]
    assert (hooked - fused).abs().max() <= TOL


def test_info_system_says_which_kernels_serve(capsys):
    """`edtir info --system` reports the C kernels' state as cpu_kernel.status() has it (on, off, or unavailable
    and why), and the same as JSON."""
    import json

    from edtir.cli import main

    assert main(["info", "--system"]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["C kernels (CPU fp32)"].strip() == cpu_kernel.status()
    assert int(lines["CPU threads"]) == torch.get_num_threads()
    with cpu_kernel.enabled(False):
        assert main(["info", "--system", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["cpu_kernels"] == "off (EDTIR_CPU_KERNEL=0)"
    assert main(["info", "--system", "--list"]) == 2
    assert "give it alone" in capsys.readouterr().err


TRAIN_CASES = [  # windows, tokens, heads, head dim, period, bias_from (None: no bias)
    (8, 144, 6, 5, 4, 2),    # EDT-T's heads, two images of 4 window rows, the last two of each with a bias
    (6, 144, 6, 15, 6, 0),   # EDT-B's, one image, every window with a bias
    (4, 15, 2, 16, 2, 1),    # 15 tokens (not a multiple of 16), head dim 16
    (3, 24, 1, 1, 3, None),  # head dim 1, no bias
]


def training_build(which: str):
    """The library whose training kernels a test takes: the AVX-512 sources' own build, or the 8-lane library (the
    same sources at 8 floats a vector, ``-DLANES=8``); skipped where it does not build."""
    lib = cpu_kernel.library() if which == "16 lanes" else cpu_kernel.library8()
    if lib is None:
        pytest.skip(f"the {which} build: {cpu_kernel.status()}")
    return lib


BUILDS = ["16 lanes", "8 lanes"]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}x{c[3]}-bias{c[5]}")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("build", BUILDS)
def test_training_attention_equals_reference(case, threads, build):
    """The training kernel's output and the gradient of its rows against autograd through the plain formula in
    float64 (:func:`cpu_kernel.reference_window_attention_rows`), in both builds: 24 tokens are 3 vectors of 8
    queries but 2 of 16, the stride of lse and of the bias rows."""
    lib = training_build(build)
    nw, n, heads, d, period, bias_from = case
    rows, bias, grad, plan = cpu_kernel._train_case(torch.Generator().manual_seed(nw + d), nw, n, heads, d, period,
                                                   bias_from or 0)
    if bias_from is None:
        bias = None
    with torch_threads(threads):
        out, ref, [(got, want)] = cpu_kernel.against_reference(
            lambda x: cpu_kernel.window_attention(x, heads, d, bias, **plan, lib=lib),
            lambda x: cpu_kernel.reference_window_attention_rows(x, heads, d, bias, **plan), [rows], grad)
    assert out.shape == (nw, n, heads * d)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    if bias is not None:  # the bias did count
        assert (ref - cpu_kernel.reference_window_attention_rows(rows.double(), heads, d)).abs().max() > 0.1


GATHERED_CASES = [  # windows, (A, B), heads, head dim, period, bias_from (None: no bias)
    (8, (6, 24), 6, 5, 4, 2),    # EDT-T's heads and windows, a bias on the last two of each image's four
    (4, (3, 5), 2, 16, 2, None),  # 15 tokens, head dim 16, no bias
]


@pytest.mark.parametrize("case", GATHERED_CASES, ids=lambda c: f"{c[0]}x{c[1][0]}x{c[1][1]}-{c[2]}x{c[3]}")
@pytest.mark.parametrize("build", BUILDS)
def test_training_attention_gathers_and_lepe_equal_reference(case, build):
    """Training as the fast path calls the kernel: rows gathered into windows by an index, LePE added, each
    token's output at its own row; the gradients of the rows and of LePE's weight and bias against autograd through
    the plain formula in float64 (:func:`cpu_kernel.reference_window_attention8`). LePE must change the output
    and its weight must get a gradient, so the test can tell."""
    lib = training_build(build)
    nw, (A, B), heads, d, period, bias_from = case
    n, hd = A * B, heads * d
    gen = torch.Generator().manual_seed(nw + d)
    rows, bias, _, plan = cpu_kernel._train_case(gen, nw, n, heads, d, period, bias_from or 0)
    bias = None if bias_from is None else bias
    kw = dict(index=torch.randperm(nw * n, generator=gen), n=n, **plan)
    lepe = [torch.randn(2, 9, hd, generator=gen) * 0.5, torch.randn(2, hd, generator=gen)]
    grad = torch.randn(nw * n, hd, generator=gen)
    with torch_threads(2):
        out, ref, grads = cpu_kernel.against_reference(
            lambda x, w, b: cpu_kernel.window_attention(x, heads, d, bias, **kw, lepe=(w, b, (A, B)), lib=lib),
            lambda x, w, b: cpu_kernel.reference_window_attention8(x, heads, d, bias, **kw, lepe=(w, b, (A, B))),
            [rows.view(nw * n, -1), *lepe], grad)
    assert out.shape == (nw * n, hd) and (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    for name, (got, want) in zip(("rows", "LePE weight", "LePE bias"), grads, strict=True):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name
    plain = cpu_kernel.reference_window_attention8(rows.view(nw * n, -1).double(), heads, d, bias, **kw)
    assert (plain - ref).abs().max() > 0.1 and grads[1][1].abs().max() > 0.1
    # a pixel's two rows side by side and padded, as the qkv projection's padded output holds them: the padding
    # (not a number here) is not read, and its gradient is zero
    padded = torch.cat([rows.view(nw * n // 2, -1), torch.full((nw * n // 2, 5), math.nan)], 1).requires_grad_()
    with torch_threads(2):
        out = cpu_kernel.window_attention(padded, heads, d, bias, **kw, lepe=(*lepe, (A, B)), lib=lib)
        out.backward(grad)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(padded.grad[:, 6 * hd:], torch.zeros(nw * n // 2, 5))
    assert (padded.grad[:, :6 * hd].reshape(nw * n, -1) - grads[0][1]).abs().max() <= 1e-5 * grads[0][1].abs().max()
    with pytest.raises(ValueError, match="LePE weights"):
        cpu_kernel.window_attention(rows.view(nw * n, -1), heads, d, **kw, lepe=(lepe[0][:, :4], lepe[1], (A, B)))


@contextlib.contextmanager
def torch_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("build", BUILDS)
def test_training_uses_the_kernel_and_its_gradients_equal_the_pytorch_path(build, monkeypatch):
    """A training step of a small EDT-T with the kernels (q, k and v unpadded) and without them (PyTorch's
    attention): the same loss and gradients for every parameter. Without AVX-512 (faked for "8 lanes") the 8-lane
    build's kernels serve."""
    want = training_build(build)
    if build == "8 lanes":
        monkeypatch.setattr(cpu_kernel, "native_avx512", lambda: False)
        monkeypatch.setattr(cpu_kernel.force, "on", False)  # the autouse fixture's force(True), undone
    calls = []
    real = cpu_kernel.window_attention
    monkeypatch.setattr(cpu_kernel, "window_attention",
                        lambda *a, **k: calls.append(cpu_kernel.training_library()) or real(*a, **k))
    model = sharpen(small_t(("sr-x2",))).train()
    x = torch.rand(2, 3, 24, 48, generator=torch.Generator().manual_seed(5))
    grads = {}
    for on in (True, False):
        model.zero_grad()
        with cpu_kernel.enabled(on):
            loss = (model(x) * torch.linspace(-1, 1, 2 * 3 * 48 * 96).view(2, 3, 48, 96)).sum()
            loss.backward()
        grads[on] = {n: p.grad.clone() for n, p in model.named_parameters()}
        if on:
            assert calls and all(lib is want for lib in calls)  # every block's attention went through the kernel
            n_calls = len(calls)
    assert len(calls) == n_calls  # and not with it off
    for name, g in grads[False].items():
        assert (grads[True][name] - g).abs().max() <= TOL * g.abs().max().clamp_min(1e-3), name


def _zero_gradient(*args):
    """A stand-in for a miscompiled training attention backward: it leaves the rows' gradient (argument 13) at
    zero."""
    nw, n, heads, d = args[15:19]
    (ctypes.c_float * (nw * n * 3 * heads * d)).from_address(args[12])[:] = [0.0] * (nw * n * 3 * heads * d)
    return 0


@built
def test_a_miscompiled_training_kernel_is_not_used():
    good = cpu_kernel.library()
    with pytest.raises(RuntimeError, match="training attention kernel is off by"):
        cpu_kernel._check(good._replace(train_backward=_zero_gradient))
    cpu_kernel._check(good)


@pytest.mark.parametrize("shape,C", [((2, 12, 16), 120), ((1, 1, 5), 16), ((1, 3, 2), 8), ((3, 7, 9), 33)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("build", BUILDS)
def test_depthwise_training_kernel_equals_reference(shape, C, threads, build):
    """GELU(5x5 depthwise conv) and its gradients (input, weight, bias) against autograd through PyTorch's conv in
    float64, in both builds: EDT-T's hidden width, single rows and maps smaller than the kernel, widths not
    multiples of 16 (or of 8)."""
    lib = training_build(build)
    h, w, b, g = cpu_kernel._dwconv_case(torch.Generator().manual_seed(C), shape, C)
    with torch_threads(threads):
        out, ref, grads = cpu_kernel.against_reference(lambda *t: cpu_kernel.dwconv_gelu(*t, lib=lib),
                                                       cpu_kernel.reference_dwconv_gelu, [h, w, b], g)
    assert out.shape == h.shape and (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    for name, (got, want) in zip(("input", "weight", "bias"), grads, strict=True):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name


@built
def test_a_miscompiled_depthwise_kernel_is_not_used():
    good = cpu_kernel.library()

    def zero_weight_gradient(*args):  # runs the real backward, then loses the weight's gradient (argument 5)
        rc = good.dwconv_backward(*args)
        C = args[-2]
        (ctypes.c_float * (25 * C)).from_address(args[5])[:] = [0.0] * (25 * C)
        return rc

    with pytest.raises(RuntimeError, match="depthwise conv kernel is off by"):
        cpu_kernel._check(good._replace(dwconv_backward=zero_weight_gradient))


@built
def test_a_hooked_depthwise_conv_is_still_called_in_training(monkeypatch):
    """The depthwise kernel skips the conv module's call: with a hook on the module, training takes PyTorch's
    conv (and the hook sees it), with the same gradients."""
    calls, seen = [], []
    real = cpu_kernel.dwconv_gelu
    monkeypatch.setattr(cpu_kernel, "dwconv_gelu", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = sharpen(small_t(("sr-x2",))).train()
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(6))
    model(x).mean().backward()
    assert calls
    conv = model.body.layers[0].residual_group.blocks[0].mlp.dwconv
    want = conv.weight.grad.clone()
    model.zero_grad()
    n = len(calls)
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        model(x).mean().backward()
    finally:
        handle.remove()
    assert seen and len(calls) - n == n - 1  # every block's conv but the hooked one went through the kernel
    assert (conv.weight.grad - want).abs().max() <= TOL * want.abs().max()


@built
def test_loading_the_library_leaves_the_random_stream_alone(monkeypatch):
    """Training loads the library at its first step (after seeding): the check on load must not draw from the
    global generator, or a resumed run (which loads it again) would not repeat the uninterrupted one."""
    monkeypatch.setattr(cpu_kernel, "_state", {"lib": None, "error": None, "path": None})
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    assert cpu_kernel.library() is not None
    assert torch.equal(torch.rand(3), want)


@built
def test_the_library_loads_first_under_inference_mode(monkeypatch):
    """restore and eval run under inference_mode, and they may be the first to ask for the library: its check on
    load (the training kernels' gradients included) must still pass there, or inference quietly loses the kernels
    (it did: `edtir eval --task sr-x2` on B100 took 289 s on PyTorch's path, 99 s with the kernels)."""
    monkeypatch.setattr(cpu_kernel, "_state", {"lib": None, "error": None, "path": None})
    model, calls = small_t().eval(), []
    with torch.inference_mode():
        assert cpu_kernel.library() is not None, cpu_kernel.status()
        monkeypatch.setattr(cpu_kernel, "block_attention",
                            lambda *a, _f=cpu_kernel.block_attention: calls.append(1) or _f(*a))
        model(torch.rand(1, 3, 24, 24), "sr-x2")
    assert calls, "the inference kernels served"
    assert cpu_kernel.status().startswith("on")


# ---------------------------------------------------------------------------------------------------------------
# The 8-lane attention kernel (cpu_attention8.c): inference where the kernels above are not used
# ---------------------------------------------------------------------------------------------------------------

built8 = pytest.mark.skipif(cpu_kernel.library8() is None, reason=f"the 8-lane kernel: {cpu_kernel._state8['error']}")


@pytest.fixture
def no_avx512(monkeypatch):
    """As on a CPU without AVX-512, whatever this one has: the kernels of a block are not wanted, the 8-lane one
    serves."""
    monkeypatch.setattr(cpu_kernel, "native_avx512", lambda: False)
    with cpu_kernel.force(False):
        yield


CASES8 = [  # windows, tokens (A x B), heads, head dim, period, bias_from (None: no bias), gathered with LePE
    (8, (6, 24), 6, 5, 4, 2, True),     # EDT-T's heads, two images of 4 window rows, a bias on the last two of each
    (6, (6, 24), 6, 15, 6, 0, True),    # EDT-B's: two chunks of channels (8 + 7), every window with a bias
    (4, (6, 24), 6, 10, 4, 3, False),   # EDT-S's, rows in window order
    (4, (3, 5), 2, 16, 2, 1, True),     # 15 tokens (not a multiple of 8 queries), head dim 16
    (2, (1, 3), 1, 1, 2, None, True),   # 3 tokens, head dim 1: every LePE tap but the centre row's is outside
    (6, (4, 4), 3, 9, 3, 1, False),     # 16 tokens, head dim 9 (a second chunk of one channel)
]


def case8(case, gen):
    """Rows, a shift-style bias (0 or -100 between labelled regions, so peaked logits show a wrong mask), and the
    kernel's keyword arguments (index and LePE when gathered)."""
    nw, (A, B), heads, d, period, bias_from, gathered = case
    n = A * B
    rows = torch.randn(nw, n, 3 * heads * d, generator=gen) * 2
    bias = None
    if bias_from is not None:
        label = torch.randint(0, 3, (period - bias_from, n), generator=gen)
        bias = torch.where(label[:, :, None] == label[:, None, :], 0.0, -100.0)[:, None]
    kw = dict(bias_from=bias_from or 0, period=period)
    if gathered:
        kw.update(index=torch.randperm(nw * n, generator=gen), n=n,
                  lepe=(torch.randn(2, 9, heads * d, generator=gen), torch.randn(2, heads * d, generator=gen), (A, B)))
        rows = rows.view(nw * n, -1)
    return rows, bias, kw


@built8
@pytest.mark.parametrize("case", CASES8, ids=lambda c: f"{c[0]}x{c[1][0]}x{c[1][1]}-{c[2]}x{c[3]}-bias{c[5]}"
                                                      f"{'-gathered' if c[6] else ''}")
@pytest.mark.parametrize("threads", [1, 2])
def test_attention8_equals_reference(case, threads):
    """Against the plain formula in float64: softmax over the base-2 logits, the bias on the windows that take one,
    the gather, LePE and the scatter back; the bias and LePE must each change the output, so the test can tell."""
    rows, bias, kw = case8(case, torch.Generator().manual_seed(sum(case[1]) + case[3]))
    heads, d = case[2], case[3]
    n = case[1][0] * case[1][1]
    keys = None if bias is None else cpu_kernel.bias_keys(bias, n)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            out = cpu_kernel.window_attention8(rows, heads, d, keys, **kw)
    finally:
        torch.set_num_threads(old)
    ref = cpu_kernel.reference_window_attention8(rows.double(), heads, d, bias, **kw)
    assert out.shape == ref.shape and (out - ref).abs().max() <= TOL
    if bias is not None:
        assert (cpu_kernel.reference_window_attention8(rows.double(), heads, d, None, **kw) - ref).abs().max() > 0.1
    if "lepe" in kw:
        plain = cpu_kernel.reference_window_attention8(rows.double(), heads, d, bias, **{**kw, "lepe": None})
        assert (plain - ref).abs().max() > 0.1


@built8
def test_attention8_rejects_what_does_not_fit():
    rows = torch.zeros(2, 15, 18)
    with pytest.raises(ValueError, match="do not hold q, k, v"):
        cpu_kernel.window_attention8(rows, 2, 4)
    with pytest.raises(ValueError, match="does not fit windows of 15"):
        cpu_kernel.window_attention8(rows, 2, 3, torch.zeros(1, 15, 15))
    with pytest.raises(ValueError, match="LePE weights"):
        cpu_kernel.window_attention8(rows, 2, 3, lepe=(torch.zeros(2, 9, 6), torch.zeros(2, 6), (4, 4)))
    with pytest.raises(ValueError, match="index must be int64"):
        cpu_kernel.window_attention8(rows.view(30, 18), 2, 3, index=torch.arange(30).int(), n=15)


@built8
@pytest.mark.parametrize("make", [small_t, small_b], ids=["EDT-T", "EDT-B-like"])
def test_model_with_the_8_lane_kernels_equals_reference(make, no_avx512, monkeypatch):
    """Without AVX-512 the fast path's attention and depthwise conv go to the 8-lane kernels (shifted blocks and
    not, two tasks) and the output is the reference's."""
    calls, convs = [], []
    real, real_conv = cpu_kernel.window_attention8, cpu_kernel.dwconv_gelu8
    monkeypatch.setattr(cpu_kernel, "window_attention8", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(cpu_kernel, "dwconv_gelu8", lambda *a, **k: convs.append(1) or real_conv(*a, **k))
    model = fast_equals_reference(make, calls, seed=6, batch=2)
    blocks = sum(len(stage.residual_group.blocks) for stage in model.body.layers)
    assert len(calls) == len(convs) == 2 * blocks  # every block of both passes


@built8
def test_attention8_serves_inference_without_avx512_only(no_avx512, monkeypatch):
    x = torch.zeros(1, 4, 4, 8)
    with torch.no_grad():
        assert cpu_kernel.serves8(x, 15) and not cpu_kernel.serves(x, 15)
        assert not cpu_kernel.serves8(x, 17)  # wider heads: PyTorch's attention
        assert not cpu_kernel.serves8(x.double(), 15)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu_kernel.serves8(x, 15)
        with cpu_kernel.enabled(False):
            assert not cpu_kernel.serves8(x, 15)
        with cpu_kernel.attention8(False):
            assert not cpu_kernel.serves8(x, 15)
            assert "EDTIR_CPU_ATTENTION8=0" in cpu_kernel.status()
        assert "the 8-lane kernel" in cpu_kernel.status()
        with cpu_kernel.force(True):  # the kernels of a block, forced, take the whole block
            assert not cpu_kernel.serves8(x, 15)
        monkeypatch.setattr(cpu_kernel, "native_avx512", lambda: True)
        assert not cpu_kernel.serves8(x, 15)  # AVX-512: the kernels of a block serve
    assert not cpu_kernel.serves8(x, 15)  # autograd on: training


@built8
def test_without_avx512_training_takes_the_8_lane_build(no_avx512):
    """Training on a CPU without AVX-512: the training kernels of the 8-lane library, and the explicit attention
    around them; with EDTIR_CPU_ATTENTION8=0 (or the kernels off) neither, and torch's fused attention."""
    x = torch.zeros(1, 4, 4, 8)
    assert cpu_kernel.training_library() is cpu_kernel.library8()
    assert cpu_kernel.serves_training(x, 15) and edt.use_explicit_attention(x, 15)
    assert not cpu_kernel.serves_training(x, 17)
    for switch in (cpu_kernel.attention8, cpu_kernel.enabled):
        with switch(False):
            assert cpu_kernel.training_library() is None
            assert not cpu_kernel.serves_training(x, 15) and not edt.use_explicit_attention(x, 15)
    with cpu_kernel.force(True):  # the AVX-512 sources forced: their own build
        assert cpu_kernel.training_library() is cpu_kernel.library()


def _pi_attention(rows, index, out, *args):
    """A stand-in for a miscompiled 8-lane attention kernel: it fills its output with pi."""
    nw_n, hd = (args[-5] * args[-4], args[-3] * args[-2])
    (ctypes.c_float * (nw_n * hd)).from_address(out)[:] = [math.pi] * (nw_n * hd)
    return 0


def _pi_dwconv(h, taps, bias, z, y, B, H, W, C, threads):
    """The same for the 8-lane depthwise conv."""
    (ctypes.c_float * (B * H * W * C)).from_address(y)[:] = [math.pi] * (B * H * W * C)
    return 0


#: a stand-in for each 8-lane entry point, and what the check on load says of it
WRONG8 = {"attention": (_pi_attention, "8-lane attention kernel is off by"),
          "dwconv_gelu": (_pi_dwconv, "8-lane depthwise conv kernel is off by"),
          "train_backward": (_zero_gradient, "training attention kernel is off by")}


@built8
@pytest.mark.parametrize("which", WRONG8)
def test_a_miscompiled_8_lane_kernel_is_not_used(which, no_avx512, monkeypatch):
    """The check on load refuses a library where a kernel (inference or training) computes something else; then
    PyTorch's ops serve, for inference and for training."""
    good = cpu_kernel.library8()
    stand_in, message = WRONG8[which]
    wrong = good._replace(**{which: stand_in})
    with pytest.raises(RuntimeError, match=message):
        cpu_kernel._check8(wrong)
    check = cpu_kernel._check8
    check(good)  # and the real ones pass
    monkeypatch.setattr(cpu_kernel, "_state8", {"lib": None, "error": None, "path": None})
    monkeypatch.setattr(cpu_kernel, "_check8", lambda lib: check(wrong))  # as if the build computed that
    assert cpu_kernel.library8() is None and "off by" in cpu_kernel._state8["error"]
    with torch.no_grad():
        assert not cpu_kernel.serves8(torch.zeros(1, 4, 4, 8), 5)  # where it would have served
    assert not cpu_kernel.serves_training(torch.zeros(1, 4, 4, 8), 5)


DWCONV8_CASES = [  # (B, H, W), C
    ((1, 24, 48), 120),   # EDT-T's hidden width
    ((1, 12, 24), 360),   # EDT-B's
    ((2, 7, 13), 20),     # two images, rows of 13 pixels, 20 channels (a last vector of 4)
    ((1, 1, 5), 8),       # one row, 5 pixels: every pixel near an edge
    ((1, 70, 70), 16),    # more than one band of rows and one block of columns
]


@built8
@pytest.mark.parametrize("shape,C", DWCONV8_CASES)
@pytest.mark.parametrize("threads", [1, 3])
def test_dwconv8_equals_reference(shape, C, threads):
    """Against the conv and erf-GELU in float64; without the conv's neighbours (its centre taps only) the output
    is far off, so the test can tell."""
    h, w, b, _ = cpu_kernel._dwconv_case(torch.Generator().manual_seed(sum(shape) + C), shape, C)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            out = cpu_kernel.dwconv_gelu8(h, w, b)
    finally:
        torch.set_num_threads(old)
    ref = cpu_kernel.reference_dwconv_gelu(h.double(), w.double(), b.double())
    assert out.shape == h.shape and (out - ref).abs().max() <= TOL
    centre = torch.zeros_like(w)
    centre[:, :, 2, 2] = w[:, :, 2, 2]
    assert (cpu_kernel.reference_dwconv_gelu(h.double(), centre.double(), b.double()) - ref).abs().max() > 100 * TOL
    with pytest.raises(ValueError, match="5x5 depthwise weight"):
        cpu_kernel.dwconv_gelu8(h, w[:, :, :3, :3], b)
