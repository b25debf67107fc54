"""The fused Triton kernels (edtir.models.kernels) against plain PyTorch, kernel by kernel and in the model.

They run on a CUDA GPU, or on the CPU through Triton's interpreter: ``test_kernels_interpreted`` reruns this
file in a fresh process with ``TRITON_INTERPRET=1`` (tiny sizes: the interpreter runs each program in Python)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_fast_paths import sharpen

import edtir
from edtir.errors import UsageError
from edtir.models import kernels
from edtir.models.edt import EDTBlock, reference_mode

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
runs_here = pytest.mark.skipif(not (kernels.available() and (CUDA or kernels.interpreting())),
                               reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1: test_kernels_interpreted)")
#: the attention kernel's query and key tiles in these tests: the smallest matrix-product tile
BLOCKS = (16, 16)


def rand_qkv(B, H, W, heads, head_dim, dtype=torch.float32, seed=0):
    """qkv in the kernel's layout, padded head-dim columns zero (as the padded projection makes them)."""
    g = torch.Generator().manual_seed(seed)
    D = kernels.head_pad(head_dim)
    qkv = torch.randn(B, H, W, 2, 3, heads, D, generator=g)
    qkv[..., head_dim:] = 0
    return qkv.reshape(B, H, W, -1).to(DEVICE, dtype)


CASES = [  # (B, H, W), window, shift, heads, head dim
    ((1, 8, 16), (4, 8), (2, 4), 2, 5),
    ((2, 8, 8), (4, 8), (0, 0), 1, 15),
    ((1, 12, 12), (4, 6), (2, 3), 2, 10),
    ((1, 8, 8), (2, 8), (1, 4), 1, 16),  # N = 16, one tile; head dim not padded
]


@runs_here
@pytest.mark.parametrize("shape,window,shift,heads,head_dim", CASES)
def test_window_attention_equals_plain_pytorch(shape, window, shift, heads, head_dim):
    torch.manual_seed(1)
    qkv = rand_qkv(*shape, heads, head_dim) * 2  # peaked softmax: a wrong mask or token would show
    lw = torch.randn(2 * heads * head_dim, 9, device=DEVICE)
    lb = torch.randn(2 * heads * head_dim, device=DEVICE)
    padded = kernels.window_attention(qkv, shape, window, shift, heads, head_dim, lw, lb, blocks=BLOCKS)
    out = kernels.unpad(padded, heads, head_dim)
    ref = kernels.reference_window_attention(qkv, shape, window, shift, heads, head_dim, lw, lb)
    assert out.shape == ref.shape == (*shape, 2 * heads * head_dim)
    assert (out - ref).abs().max() <= 1e-4
    assert not padded.unflatten(-1, (2 * heads, -1))[..., head_dim:].any()  # the padding is zeros
    if shift != (0, 0):  # the mask matters here: without it the output differs
        plain = kernels.reference_window_attention(qkv, shape, window, (0, 0), heads, head_dim, lw, lb)
        assert (plain - ref).abs().max() > 1e-2


@runs_here
def test_dwconv_gelu_and_layer_norm_equal_pytorch():
    torch.manual_seed(2)
    x = torch.randn(2, 7, 37, 20, device=DEVICE)  # widths and channels that are not multiples of the blocks
    w, b = torch.randn(20, 1, 5, 5, device=DEVICE), torch.randn(20, device=DEVICE)
    ref = F.gelu(F.conv2d(x.permute(0, 3, 1, 2), w, b, padding=2, groups=20)).permute(0, 2, 3, 1)
    for rows in (1, 2, 4):  # 7 rows: the last program of 2 or 4 rows has rows beyond the map
        out = kernels.dwconv_gelu(x, w, b, blocks=(16, 16), rows=rows)
        assert (out - ref).abs().max() <= 1e-4, rows
    # weights laid out beforehand (as a block keeps them) are the ones used, not ``weight``/``bias`` again
    ref2 = F.gelu(F.conv2d(x.permute(0, 3, 1, 2), 2 * w, b, padding=2, groups=20)).permute(0, 2, 3, 1)
    out = kernels.dwconv_gelu(x, w, b, blocks=(16, 16), rows=2, laid=kernels.dwconv_weights(2 * w, b))
    assert (out - ref2).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="rows"):
        kernels.dwconv_gelu(x, w, b, rows=3)
    norm = torch.nn.LayerNorm(20).to(DEVICE)
    norm.weight.data.normal_()
    norm.bias.data.normal_()
    assert (kernels.layer_norm(x, norm) - norm(x)).abs().max() <= 1e-5
    assert kernels.layer_norm(x, norm, torch.bfloat16).dtype == torch.bfloat16
    # the residual add fused in, from a column slice (a padded product's output), the norm written 32 wide
    wide = torch.randn(2, 7, 37, 24, device=DEVICE)
    total, normed = kernels.layer_norm(x, norm, add=wide[..., :20], width=32)
    assert (total - (x + wide[..., :20])).abs().max() <= 1e-6
    assert normed.shape == (2, 7, 37, 32) and not normed[..., 20:].any()
    assert (normed[..., :20] - norm(total)).abs().max() <= 1e-5


@runs_here
@pytest.mark.parametrize("m,k,n,ldw", [(300, 192, 360, 360), (77, 360, 180, 184), (5, 40, 20, 24)])
def test_linear_with_its_epilogues_equals_pytorch(m, k, n, ldw):
    """The product kernel: K not a multiple of its depth, N narrower than the padded weight, rows not a multiple
    of the tile; plain, with GELU, with the residual added."""
    g = torch.Generator().manual_seed(5)
    a, w, b = torch.randn(m, k, generator=g), torch.randn(ldw, k, generator=g) * 0.1, torch.randn(ldw, generator=g)
    r = torch.randn(m, n, generator=g).to(DEVICE)
    a, w, b = a.to(DEVICE), w.to(DEVICE), b.to(DEVICE)
    wt, bf = kernels.product_weights((w, b))
    ref = F.linear(a, w, b)[:, :n]
    blocks = (32, 32, 32, 4)
    assert (kernels.linear(a, wt, bf, n, blocks=blocks) - ref).abs().max() <= 1e-4
    assert (kernels.linear(a, wt, bf, n, gelu=True, blocks=blocks) - F.gelu(ref)).abs().max() <= 1e-4
    out = kernels.linear(a.view(m, 1, k), wt, bf, n, residual=r.view(m, 1, n), blocks=(32, 64, 32, 4))
    assert out.shape == (m, 1, n) and (out.view(m, n) - (ref + r)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="linear"):
        kernels.linear(a, wt, bf, ldw + 8)


@runs_here
def test_norm_inside_the_product_equals_pytorch():
    """The norm-and-product kernel: rows not a multiple of its tile, N not a multiple of its step, the weight wider
    than the norm (zero rows) and than N; with the residual added from a column slice, and GELU."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 7, 20, generator=g).to(DEVICE)
    wide = torch.randn(3, 7, 24, generator=g).to(DEVICE)
    norm = torch.nn.LayerNorm(20)
    norm.weight.data.normal_(generator=g)
    norm.bias.data.normal_(generator=g)
    norm = norm.to(DEVICE)
    w, b = torch.randn(40, 32, generator=g).to(DEVICE), torch.randn(40, generator=g).to(DEVICE)
    w[:, 20:] = 0  # the zero columns a padded norm width gives
    wt, bf = kernels.product_weights((w, b))
    blocks = (16, 16, 4)
    out = kernels.norm_linear(x, norm, wt, bf, 36, blocks=blocks)
    assert out.shape == (3, 7, 36) and (out - F.linear(norm(x), w[:, :20], b)[..., :36]).abs().max() <= 1e-4
    total, out = kernels.norm_linear(x, norm, wt, bf, 40, gelu=True, add=wide[..., :20], blocks=blocks)
    assert (total - (x + wide[..., :20])).abs().max() <= 1e-6
    assert (out - F.gelu(F.linear(norm(total), w[:, :20], b))).abs().max() <= 1e-4


@runs_here
@pytest.mark.parametrize("task,shape,products", [  # batch 2 once, denoising (its head and tail) once: the interpreter
    ("sr-x2", (2, 3, 8, 16), "none"), ("sr-x2", (1, 3, 8, 16), "all"), ("denoise-25", (1, 3, 32, 64), "norms")])
def test_fused_model_equals_reference(task, shape, products, monkeypatch):
    """A whole EDT (EDT-T widths, small windows so the interpreter copes) through the fused kernels equals the
    reference path in fp32, with the products in cuBLAS, in the Triton kernel ("ffn" is a part of "all"), and with
    the norms inside the products."""
    monkeypatch.setattr(kernels, "ATTENTION_BLOCKS", BLOCKS)
    for name, tiles in (("LINEAR_BLOCKS", (32, 32, 32, 4)), ("NORM_LINEAR_BLOCKS", (16, 32, 4))):
        monkeypatch.setattr(kernels, name, tiles)
        monkeypatch.setattr(kernels, name + "_FP32", tiles)
    monkeypatch.setattr(kernels, "PRODUCTS", products)
    monkeypatch.setattr(kernels, "DWCONV_ROWS", {"none": 1, "all": 2, "norms": 4}[products])
    model = sharpen(edtir.build_model("T", [task], depths=(2,), window_size=(4, 8), drop_path=0.0)).to(DEVICE).eval()
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    used, products_used = [], []
    monkeypatch.setattr(kernels, "window_attention", lambda *a, _f=kernels.window_attention, **k:
                        used.append(1) or _f(*a, **k))
    monkeypatch.setattr(kernels, "linear", lambda *a, _f=kernels.linear, **k: products_used.append(1) or _f(*a, **k))
    monkeypatch.setattr(kernels, "norm_linear", lambda *a, _f=kernels.norm_linear, **k:
                        products_used.append(2) or _f(*a, **k))
    with torch.no_grad():
        fused = model(x, task)
        assert used, "the fused kernels did not run"
        # four products in each of two blocks; with "norms", two of them with their norms (2 in the list)
        assert products_used == {"none": [], "all": [1] * 8, "norms": [2, 1, 2, 1] * 2}[products]
        with reference_mode():
            ref = model(x, task)
        with kernels.enabled(False):
            eager = model(x, task)
    assert (fused - ref).abs().max() <= 1e-4
    assert (fused - eager).abs().max() <= 1e-4
    if products == "all":  # weights changed in place (a training step, a load): the kept layouts are made anew
        with torch.no_grad():
            for blk in model.modules():
                if isinstance(blk, EDTBlock):
                    blk.mlp.dwconv.weight.mul_(-4.0)
                    blk.mlp.fc2.weight.mul_(3.0)
            changed = model(x, task)
            with reference_mode():
                ref = model(x, task)
        assert (changed - ref).abs().max() <= 1e-4
        assert (changed - fused).abs().max() > 1e-3  # ten times the tolerance: stale layouts would fail above


@pytest.mark.skipif(not (CUDA and kernels.available()), reason="needs a CUDA GPU with Triton (the interpreter "
                    "multiplies in plain fp32 whatever the precision asked)")
def test_tf32x3_products_on_cuda():
    """The fp32 option that runs the attention's products on tensor cores keeps the fp32 bound."""
    shape, window, shift, heads, head_dim = (1, 48, 72), (6, 24), (3, 12), 6, 15
    qkv = rand_qkv(*shape, heads, head_dim) * 2
    lw = torch.randn(2 * heads * head_dim, 9, device=DEVICE)
    lb = torch.randn(2 * heads * head_dim, device=DEVICE)
    out = kernels.window_attention(qkv, shape, window, shift, heads, head_dim, lw, lb, fp32_products="tf32x3")
    ref = kernels.reference_window_attention(qkv, shape, window, shift, heads, head_dim, lw, lb)
    assert (kernels.unpad(out, heads, head_dim) - ref).abs().max() <= 1e-4


def test_tile_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("EDTIR_ATTENTION_BLOCKS", "64,32,4")
    assert kernels._tiles("EDTIR_ATTENTION_BLOCKS", (32, 16, 2)) == (64, 32, 4)
    monkeypatch.delenv("EDTIR_ATTENTION_BLOCKS")
    assert kernels._tiles("EDTIR_ATTENTION_BLOCKS", (32, 16, 2)) == (32, 16, 2)
    for bad in ("64,32", "64,30,4", "a,b,c", "0,16,2"):
        monkeypatch.setenv("EDTIR_ATTENTION_BLOCKS", bad)
        with pytest.raises(UsageError, match="EDTIR_ATTENTION_BLOCKS"):
            kernels._tiles("EDTIR_ATTENTION_BLOCKS", (32, 16, 2))
    monkeypatch.setenv("EDTIR_LINEAR_BLOCKS", "64,128,32,8")
    assert kernels._tiles("EDTIR_LINEAR_BLOCKS", (128, 128, 64, 4)) == (64, 128, 32, 8)
    monkeypatch.setenv("EDTIR_LINEAR_BLOCKS", "64,128,32")
    with pytest.raises(UsageError, match="expected 4 powers of two"):
        kernels._tiles("EDTIR_LINEAR_BLOCKS", (128, 128, 64, 4))
    for value, bf16, fp32 in (("auto", "ffn", ""), ("none", "", ""), ("all", "all", "all"),
                              ("norms", "norms", "norms")):
        monkeypatch.setenv("EDTIR_TRITON_PRODUCTS", value)
        monkeypatch.setattr(kernels, "PRODUCTS", kernels._products())
        monkeypatch.setattr(kernels, "FP32_PRODUCTS", "ieee")
        assert (kernels.products_in_triton(torch.bfloat16), kernels.products_in_triton(torch.float32)) == (bf16, fp32)
    monkeypatch.setattr(kernels, "PRODUCTS", "auto")
    monkeypatch.setattr(kernels, "FP32_PRODUCTS", "tf32x3")
    assert kernels.products_in_triton(torch.float32) == "all"  # fp32 products on tensor cores: all four in Triton
    monkeypatch.setenv("EDTIR_DWCONV_ROWS", "4")
    assert kernels._dwconv_rows() == 4
    monkeypatch.setenv("EDTIR_DWCONV_ROWS", "3")
    with pytest.raises(UsageError, match="EDTIR_DWCONV_ROWS"):
        kernels._dwconv_rows()
    monkeypatch.setenv("EDTIR_TRITON_PRODUCTS", "cublas")
    with pytest.raises(UsageError, match="EDTIR_TRITON_PRODUCTS"):
        kernels._products()
    monkeypatch.setenv("EDTIR_FP32_PRODUCTS", "tf32x3")
    assert kernels._fp32_products() == "tf32x3"
    monkeypatch.setenv("EDTIR_FP32_PRODUCTS", "tf32")  # TF32 alone would break the fp32 bound
    with pytest.raises(UsageError, match="EDTIR_FP32_PRODUCTS"):
        kernels._fp32_products()


@runs_here
def test_a_failing_kernel_falls_back_to_pytorch_with_one_warning(monkeypatch):
    """A kernel that does not compile on some GPU must not fail the user's run: one warning, then PyTorch's path."""
    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel image for this GPU")

    calls = []
    monkeypatch.setattr(kernels, "window_attention", broken)
    monkeypatch.setattr(kernels, "_failed", set())
    model = edtir.build_model("T", ["sr-x2"], depths=(2,), window_size=(4, 8), drop_path=0.0).to(DEVICE).eval()
    x = torch.rand(1, 3, 8, 16, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="fused Triton kernels failed"):
            out = model(x)
        again = model(x)
        with kernels.enabled(False):
            eager = model(x)
    assert len(calls) == 1  # not retried
    assert torch.equal(out, eager) and torch.equal(again, eager)


@pytest.mark.skipif(kernels.triton is None or CUDA, reason="needs Triton; on a GPU the tests above run directly")
def test_kernels_interpreted():
    """This file's tests on the CPU, in Triton's interpreter (a fresh process: the variable is read at import)."""
    env = dict(os.environ, TRITON_INTERPRET="1", EDTIR_TRITON="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "not interpreted and not cuda"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(__file__))
    assert r.returncode == 0 and " skipped" not in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.skipif(not (CUDA and kernels.available()), reason="needs a CUDA GPU with Triton (bf16 is wrong in "
                    "Triton's interpreter)")
def test_bf16_kernels_on_cuda():
    """bf16 q/k/v (as under autocast): close to the fp32 result of the same inputs."""
    for shape, window, shift, heads, head_dim in CASES + [((1, 48, 72), (6, 24), (3, 12), 6, 15)]:
        qkv = rand_qkv(*shape, heads, head_dim, dtype=torch.bfloat16)
        lw = torch.randn(2 * heads * head_dim, 9, device=DEVICE)
        lb = torch.randn(2 * heads * head_dim, device=DEVICE)
        out = kernels.unpad(kernels.window_attention(qkv, shape, window, shift, heads, head_dim, lw, lb), heads,
                            head_dim)
        ref = kernels.reference_window_attention(qkv, shape, window, shift, heads, head_dim, lw, lb)
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max(), (shape, window)


@pytest.mark.skipif(not (CUDA and kernels.available()), reason="needs a CUDA GPU with Triton")
@pytest.mark.parametrize("size", ["T", "B"])
@pytest.mark.parametrize("products,fp32_products", [("none", "ieee"), ("auto", "tf32x3"), ("all", "ieee")])
def test_fused_edt_on_cuda(size, products, fp32_products):
    """EDT-T/B widths, the default 6x24 windows and tiles: fused = reference in fp32 (TF32 off), close in bf16;
    with the products in cuBLAS, in the Triton kernel with three TF32 products (fp32's default there), and in
    the Triton kernel at full precision."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = sharpen(edtir.build_model(size, ["sr-x2"], depths=(2, 2), drop_path=0.0)).cuda().eval()
    x = torch.rand(2, 3, 48, 72, device="cuda")
    with torch.no_grad(), kernels.settings(products, fp32_products):
        fused = model(x)
        with reference_mode():
            ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused16 = model(x).float()
    assert (fused - ref).abs().max() <= 1e-4
    assert (fused16 - ref).abs().max() < 0.05
