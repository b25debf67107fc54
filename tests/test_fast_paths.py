"""The fast attention path equals the plain reference formulation (fp32, <= 1e-4), forward and backward, and
its masks and gather indices are right, cached or computed from a traced shape."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DATA, need

import edtir
from edtir.data.io import read_image
from edtir.models import cpu_kernel, edt
from edtir.models.edt import LayoutCache, WindowLayout, reference_mode, shift_mask, window_partition

TOL = 1e-4


def sharpen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with larger q/k projections, so the attention is peaked (not near-uniform) and a wrong
    mask, window or token order would show."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("qkv.weight"):
            p.data.normal_(0, 0.25)
        elif name.endswith("lepe.weight") or name.endswith("lepe.bias"):
            p.data.normal_(0, 0.3)
    return model


def small_b(tasks=("sr-x2",), **kw):
    """EDT-B's widths and heads (head dim 15, padded to 16 on the CPU) with one unshifted and one shifted block."""
    return edtir.build_model("B", list(tasks), depths=(2,), drop_path=0.0, **kw)


def small_t(tasks=("sr-x2",), **kw):
    """EDT-T's widths and heads (head dim 5, not padded on the CPU)."""
    return edtir.build_model("T", list(tasks), depths=(2, 2), drop_path=0.0, **kw)


def both_paths(model, x, task=None):
    with torch.no_grad():
        fast = model(x, task=task)
        with reference_mode():
            ref = model(x, task=task)
    return fast, ref


@pytest.fixture(params=["C kernel", "C 8-lane", "PyTorch"])
def cpu_path(request, monkeypatch):
    """CPU inference three ways: through the C kernels of a block (where they build), through PyTorch's ops with
    the 8-lane attention and depthwise kernels (what a CPU without AVX-512 runs, whatever this one has) and through
    PyTorch's ops alone."""
    if request.param == "C 8-lane":
        monkeypatch.setattr(cpu_kernel, "native_avx512", lambda: False)
    on, forced = request.param != "PyTorch", request.param == "C kernel"
    with cpu_kernel.enabled(on), cpu_kernel.force(forced):  # forced: without AVX-512 they would not be chosen
        yield request.param


@pytest.fixture
def pytorch_path():
    """Tests of the PyTorch fast path's own parts: the C kernel off."""
    with cpu_kernel.enabled(False):
        yield


@pytest.fixture(scope="module")
def butterfly() -> torch.Tensor:
    img = read_image(need(DATA / "Set5" / "butterfly.png"))
    return torch.from_numpy(img).permute(2, 0, 1).float().div(255).unsqueeze(0)


# ------------------------------------------------------------------------------------------------------------
# Masks and indices
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("H,W,window", [(48, 48, (6, 24)), (24, 72, (6, 24)), (72, 24, (24, 6)), (16, 32, (8, 8)),
                                        (32, 48, (4, 16))])
def test_traced_masks_equal_cached_masks(H, W, window):
    shift = (window[0] // 2, window[1] // 2)
    for win, sh in ((window, shift), (window[::-1], shift[::-1])):
        cached = shift_mask(H, W, win, sh)
        assert cached.abs().sum() > 0  # the check compares real masks
        assert torch.equal(edt.traced_shift_mask(H, W, win, sh, "cpu"), cached)
        assert torch.equal(edt.traced_shift_mask(torch.tensor(H), torch.tensor(W), win, sh, "cpu"), cached)


@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("H,W,window", [(48, 72, (6, 24)), (16, 32, (8, 8)), (32, 16, (4, 16))])
def test_layout_gathers_the_rolled_windows_of_both_branches(H, W, window, sort):
    """gather == roll + window_partition (the vertical branch transposed inside its windows), in some window
    order; scatter is its inverse; the bias is the reference masks in the same order, and (sorted) every window
    before ``bias_from`` has a zero mask in both branches."""
    (wh, ww), (sh, sw) = window, (window[0] // 2, window[1] // 2)
    layout = WindowLayout(H, W, window, (sh, sw), "cpu", sort=sort)
    pos = torch.arange(H * W).view(1, H, W)
    N = wh * ww
    ref_h = shift_mask(H, W, (wh, ww), (sh, sw))
    ref_v = shift_mask(H, W, (ww, wh), (sw, sh)).view(-1, ww, wh, ww, wh).permute(0, 2, 1, 4, 3).reshape(-1, N, N)
    for s in (0, 1):
        g = layout.gather[s]
        assert torch.equal(g[layout.scatter[s]], torch.arange(2 * H * W))
        rows = g.view(-1, 2, N)
        assert torch.equal(rows[:, 0] % 2, torch.zeros_like(rows[:, 0])) and rows[:, 1].remainder(2).eq(1).all()
        hor = window_partition(torch.roll(pos, (-sh * s, -sw * s), (1, 2)), wh, ww)
        ver = window_partition(torch.roll(pos, (-sw * s, -sh * s), (1, 2)), ww, wh)
        ver = ver.view(-1, ww, wh).transpose(1, 2).reshape(-1, N)
        # the window order the layout chose, found by each window's first token
        order_h = (rows[:, 0, :1] // 2 == hor[:, 0]).nonzero()[:, 1]
        order_v = (rows[:, 1, :1] // 2 == ver[:, 0]).nonzero()[:, 1]
        assert torch.equal(rows[:, 0] // 2, hor[order_h]) and torch.equal(rows[:, 1] // 2, ver[order_v])
        if s == 0 or not sort:
            assert torch.equal(order_h, torch.arange(len(hor))) and torch.equal(order_v, order_h)
    bias = layout.bias(1, torch.float32).view(-1, 2, N, N)
    assert torch.equal(bias[:, 0], ref_h[order_h]) and torch.equal(bias[:, 1], ref_v[order_v])
    first = layout.bias_from
    assert (sort or first == 0) and bias.view(-1, N, N)[:first].abs().sum() == 0
    assert first > 0 or not sort or H // wh == 1 or W // ww == 1  # else some windows have no mask
    assert torch.equal(layout.tail_bias(torch.float32), bias.view(-1, 1, N, N)[first:])
    if sort:  # every window with a mask comes after bias_from, in either branch
        assert bias[first // 2:].flatten(2).ne(0).any(-1).any(-1).all()
    assert torch.equal(layout.bias(3, torch.float32), bias.flatten(0, 1).unsqueeze(1).repeat(3, 1, 1, 1))


def test_exporting_builds_the_layout_from_the_traced_shape(monkeypatch):
    cache = LayoutCache((6, 24), (3, 12))
    cached = cache(48, 72, torch.device("cpu"))
    assert cache(48, 72, torch.device("cpu")) is cached
    monkeypatch.setattr(edt, "exporting", lambda: True)
    fresh = cache(torch.tensor(48), torch.tensor(72), torch.device("cpu"))
    assert fresh is not cached
    unsorted = WindowLayout(48, 72, (6, 24), (3, 12), "cpu", sort=False)  # export keeps the natural window order
    for a, b in zip(fresh.gather + fresh.scatter, unsorted.gather + unsorted.scatter, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(fresh.bias(torch.tensor(2), torch.float32), unsorted.bias(2, torch.float32))


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_traced_model_serves_other_sizes(path):
    """One trace (as an ONNX export makes) gives the eager output at other sizes and batch sizes."""
    model = sharpen(small_t()).eval()
    with edt.attention_mode(path), torch.no_grad():
        traced = torch.jit.trace(model, (torch.rand(1, 3, 24, 48),), check_trace=False)
        for shape in ((1, 3, 48, 72), (2, 3, 72, 24)):
            x = torch.rand(shape)
            torch.testing.assert_close(traced(x), model(x), atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# Fast == reference
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [small_t, small_b], ids=["EDT-T", "EDT-B-like"])
@pytest.mark.parametrize("task", ["sr-x2", "sr-x3", "sr-x4", "denoise-25", "derain-heavy"])
def test_fast_equals_reference_random_inputs(make, task, cpu_path):
    model = sharpen(make([task])).eval()
    m = model.size_multiple(task)
    side = 2 * m if m < 96 else m
    x = torch.rand(2, 3, side, m)  # batch > 1, non-square
    fast, ref = both_paths(model, x, task)
    assert ref.abs().max() > 0.5  # a real output, not a degenerate one
    assert (fast - ref).abs().max() <= TOL


@pytest.mark.parametrize("make", [small_t, small_b], ids=["EDT-T", "EDT-B-like"])
def test_fast_equals_reference_on_a_real_image_with_padding(make, butterfly, cpu_path):
    """An odd-sized crop of Set5 through edtir.restore (mirror padding to the size multiple, then cropping)."""
    model = sharpen(make()).eval()
    image = butterfly[..., 101:138, 57:110]  # 37 x 53
    fast = edtir.restore(model, image)
    with reference_mode():
        ref = edtir.restore(model, image)
    assert fast.shape == (1, 3, 74, 106)
    assert (fast - ref).abs().max() <= TOL


@pytest.mark.parametrize("rule", ["none", "cuda", "16", "q and k 8, v 16"])
def test_every_head_dim_padding_equals_reference(rule, monkeypatch, pytorch_path):
    """The CUDA rule (a multiple of 8: 5 -> 8, 15 -> 16), no padding, 16, and q/k padded less than v (the CPU's
    explicit attention for EDT-T) give the reference output, with the explicit attention and the fused kernel."""
    pads = {"none": lambda device, d, explicit=False: (d, d),
            "cuda": lambda device, d, explicit=False: (-(-d // 8) * 8,) * 2,
            "16": lambda device, d, explicit=False: (16, 16),
            "q and k 8, v 16": lambda device, d, explicit=False: (max(8, d), 16)}
    monkeypatch.setattr(edt, "head_pad", pads[rule])
    for explicit in (True, False) if rule != "q and k 8, v 16" else (True,):
        monkeypatch.setattr(edt.explicit_attention, "on", explicit)
        for make in (small_t, small_b):
            model = sharpen(make()).eval()
            fast, ref = both_paths(model, torch.rand(2, 3, 24, 48))
            assert (fast - ref).abs().max() <= TOL


@pytest.mark.parametrize("window", [(24, 6), (8, 8), (4, 16)])
def test_fast_equals_reference_other_windows(window, cpu_path):
    model = sharpen(edtir.build_model("T", ["sr-x2"], depths=(2,), window_size=window)).eval()
    m = model.size_multiple()
    fast, ref = both_paths(model, torch.rand(1, 3, 2 * m, 3 * m))
    assert (fast - ref).abs().max() <= TOL


def test_reference_path_reproduces_the_official_output(official_pair):
    """(test_models checks the default fast path on the same pair.)"""
    sd, io = official_pair
    model = edtir.load_model(sd)
    with torch.no_grad(), reference_mode():
        ref = model(torch.from_numpy(io["input"]))
    np.testing.assert_allclose(ref.numpy(), io["output"], atol=2e-5, rtol=0)


@pytest.mark.parametrize("make", [small_t, small_b], ids=["EDT-T", "EDT-B-like"])
def test_gradients_equal_reference(make, butterfly):
    """Training runs the fast path: its gradients equal the reference's, for every parameter."""
    model = sharpen(make(["sr-x2", "denoise-15"])).train()
    inputs = {"sr-x2": butterfly[..., :24, :48].repeat(2, 1, 1, 1), "denoise-15": torch.rand(1, 3, 96, 192)}
    grads = {}
    for path in ("fast", "reference"):
        model.zero_grad()
        with edt.attention_mode(path):
            out = model.forward_multi(inputs)
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out.values()).backward()
        grads[path] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["reference"].items():
        scale = g.abs().max().clamp_min(1e-3)
        assert (grads["fast"][name] - g).abs().max() / scale <= TOL, name
    assert grads["fast"]["body.layers.0.residual_group.blocks.1.attns.1.lepe.weight"].abs().sum() > 0


def test_drop_path_is_the_same_on_both_paths(butterfly):
    """Training with stochastic depth: the fast path (the mask's factor and the residual add in one addcmul) drops
    the same samples as the reference path from the same seed, with the same output and gradients; and it does
    drop (a model without it gives another output)."""
    model = sharpen(edtir.build_model("T", ["sr-x2"], depths=(2, 2), drop_path=0.5)).train()
    x = butterfly[..., :24, :48].repeat(4, 1, 1, 1)
    outs, grads = {}, {}
    for path in ("fast", "reference"):
        model.zero_grad()
        torch.manual_seed(3)
        with edt.attention_mode(path):
            outs[path] = model(x)
        (outs[path] * torch.linspace(-1, 1, outs[path].numel()).view_as(outs[path])).sum().backward()
        grads[path] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert (outs["fast"] - outs["reference"]).abs().max() <= TOL
    for name, g in grads["reference"].items():
        assert (grads["fast"][name] - g).abs().max() <= TOL * g.abs().max().clamp_min(1e-3), name
    for block in (b for stage in model.body.layers for b in stage.residual_group.blocks):
        block.drop_path.p = 0.0
    with torch.no_grad():
        assert (model(x) - outs["fast"]).abs().max() > 1e-3


def test_bf16_autocast_fast_close_to_reference(butterfly):
    model = sharpen(small_b()).eval()
    x = butterfly[..., :48, :48]
    ref = both_paths(model, x)[1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(x).float()
    assert (fast - ref).abs().max() < 0.05


def test_reference_mode_restores_the_previous_path():
    assert edt._path[0] == "fast"
    with reference_mode():
        assert edt._path[0] == "reference"
        with edt.attention_mode("fast"):
            assert edt._path[0] == "fast"
        assert edt._path[0] == "reference"
    assert edt._path[0] == "fast"
    with pytest.raises(ValueError, match="unknown attention path"):
        with edt.attention_mode("turbo"):
            pass


def test_layouts_cached_under_inference_mode_serve_training():
    """Masks, indices and weight orders built inside torch.inference_mode are ordinary tensors: a training step
    after an inference pass (validation, then training) must work."""
    model = small_t()
    x = torch.rand(1, 3, 24, 48)
    with torch.inference_mode():
        model.eval()(x)
        with reference_mode():
            model(x)
    model.train()
    for path in ("fast", "reference"):
        with edt.attention_mode(path):
            model.zero_grad()
            model(x).mean().backward()
        assert model.body.layers[0].residual_group.blocks[1].qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_windowed_attention_equals_sdpa(chunk):
    """The CPU's explicit attention (small heads, fp32 inference) against the fused kernel: with and without the
    shift bias, chunks that do and don't divide the windows, a bias for the last windows of each image only."""
    from edtir.models.edt import windowed_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, 6, 144, 5, generator=g) for _ in range(3))
    bias = torch.where(torch.rand(10, 1, 144, 144, generator=g) < 0.3, -100.0, 0.0)
    for b in (None, bias):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=b, scale=0.4)
        got = windowed_attention(q, k, v, b, 0.4, chunk=chunk)
        assert got.shape == (10, 6, 144, 5) and (got - want).abs().max() < 1e-5
    tail = torch.zeros_like(bias)  # two images of 5 windows, the same bias from the fourth window of each
    tail[3:5] = tail[8:10] = bias[3:5]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=tail, scale=0.4)
    got = windowed_attention(q * 0.4, k, v, bias[3:5], chunk=chunk, bias_from=3, period=5)
    assert (got - want).abs().max() < 1e-5
    assert (got - F.scaled_dot_product_attention(q, k, v, scale=0.4)).abs().max() > 0.1  # the bias did count
    wide = torch.randn(10, 6, 144, 16, generator=g)  # v wider than q and k, as EDT-T's on the CPU
    want = torch.softmax(q @ k.transpose(-1, -2) * 0.4 + bias, -1) @ wide
    assert (windowed_attention(q, k, wide, bias, 0.4, chunk=chunk) - want).abs().max() < 1e-5


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_windowed_attention_gradients(chunk):
    """The training form (the backward recomputes the probabilities per chunk) against autograd through the plain
    formula, in float64: q, k and a wider v, a bias on the last windows of each of two images."""
    from edtir.models.edt import windowed_attention

    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(6, 2, 12, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(6, 2, 12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.where(torch.rand(1, 1, 12, 12, generator=g) < 0.3, -100.0, 0.0).double()
    full = torch.zeros(6, 1, 12, 12, dtype=torch.float64)
    full[2] = full[5] = bias[0]  # two images of 3 windows, a bias on the third window of each
    d_out = torch.randn(6, 2, 12, 5, generator=g, dtype=torch.float64)
    got = windowed_attention(q, k, v, bias, 0.7, chunk=chunk, bias_from=2, period=3)
    grads = torch.autograd.grad(got, (q, k, v), d_out)
    want = torch.softmax(q @ k.transpose(-1, -2) * 0.7 + full, -1) @ v
    wants = torch.autograd.grad(want, (q, k, v), d_out)
    assert (got - want).abs().max() < 1e-12
    for a, b in zip(grads, wants, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-12
    assert torch.autograd.gradcheck(
        lambda q, k, v: windowed_attention(q, k, v, bias, 0.7, chunk=chunk, bias_from=2, period=3), (q, k, v))


def test_explicit_attention_is_chosen_for_cpu_fp32(pytorch_path, monkeypatch):
    from edtir.models import edt

    x = torch.zeros(1, 2, 2, 60)
    with torch.no_grad():
        assert all(edt.use_explicit_attention(x, d) for d in (5, 10, 15))  # EDT's head dims
        assert not edt.use_explicit_attention(x, 32)
        assert not edt.use_explicit_attention(x.bfloat16(), 5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not edt.use_explicit_attention(x, 5)
    for avx512 in (True, False):  # training too (its own backward) with AVX-512; without it, torch's fused kernel
        monkeypatch.setattr(cpu_kernel, "native_avx512", lambda a=avx512: a)
        assert edt.use_explicit_attention(x, 5) == avx512
        with torch.no_grad():
            assert edt.use_explicit_attention(x, 5)
        with cpu_kernel.enabled(True), cpu_kernel.force(True):  # the C kernels forced: theirs
            assert edt.use_explicit_attention(x, 5)
    monkeypatch.undo()
    model = edt.build_model("T", ["sr-x2"], depths=(2,)).eval()
    img = torch.rand(1, 3, 48, 72)
    with torch.no_grad():
        explicit = model(img)
        with edt.explicit_attention(False):
            fused = model(img)
        with edt.attention_mode("reference"):
            ref = model(img)
    assert (explicit - ref).abs().max() <= 1e-5 and (fused - ref).abs().max() <= 1e-5


def test_compiled_blocks_equal_reference():
    """``edt.compile_blocks`` (``benchmarks/perf_suite.py --compile``): the compiled fast path (in-place writes
    become plain adds under torch.compile) must still give the reference output."""
    model = sharpen(edtir.build_model("T", ["sr-x2"], depths=(2,), drop_path=0.0)).eval()
    x = torch.rand(1, 3, 24, 48)
    with torch.no_grad(), reference_mode():
        ref = model(x)
    edt.compile_blocks(model)
    with torch.no_grad():
        out = model(x)
    torch._dynamo.reset()
    assert ref.abs().max() > 0.5
    assert (out - ref).abs().max() <= TOL
