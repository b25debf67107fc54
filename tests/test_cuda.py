"""GPU checks (skipped without CUDA; run on a lent GPU with `pytest tests/test_cuda.py`)."""

import numpy as np
import pytest
import torch
from test_models import REFERENCE

import edtir
from edtir.data.io import read_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_official_output_on_cuda_fp32_and_bf16(official_pair):
    sd, io = official_pair
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = edtir.load_model(sd, device="cuda")
    x = torch.from_numpy(io["input"]).cuda()
    with torch.no_grad():
        out = model(x).cpu().numpy()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out16 = model(x).float().cpu().numpy()
    assert np.abs(out - io["output"]).max() < 1e-4
    assert np.isfinite(out16).all() and np.abs(out16 - io["output"]).max() < 0.1


def test_tiled_equals_untiled_on_cuda():
    torch.manual_seed(0)
    model = edtir.build_model("T", ["sr-x2"]).cuda().eval()
    image = read_image(REFERENCE.parent / "data" / "Set14" / "monarch.png")[:200, :300]
    full = edtir.restore(model, image, device="cuda")
    tiled = edtir.restore(model, image, device="cuda", tile=96, tile_overlap=24, tile_batch=4)
    assert np.abs(full.astype(int) - tiled.astype(int)).max() <= 1


def test_training_step_bf16_on_cuda():
    torch.manual_seed(0)
    model = edtir.build_model("T", ["sr-x2", "denoise-15"]).cuda().train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    batch = {"sr-x2": torch.rand(4, 3, 48, 48, device="cuda"), "denoise-15": torch.rand(4, 3, 192, 192, device="cuda")}
    target = {"sr-x2": torch.rand(4, 3, 96, 96, device="cuda"), "denoise-15": torch.rand(4, 3, 192, 192, device="cuda")}
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.forward_multi(batch)
            loss = sum((out[t].float() - target[t]).abs().mean() for t in out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_fused_attention_kernels_are_used_in_training():
    """head_dim 5 (EDT-T) and 15 (EDT-B) are padded so SDPA's memory-efficient kernel runs, not the math path
    that stores every attention matrix; forcing that kernel must work, and match the math path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    for size in ("T", "B"):
        model = edtir.build_model(size, ["sr-x2"], drop_path=0.0).cuda().train()
        x = torch.rand(2, 3, 48, 48, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
                fused = model(x)
            with sdpa_kernel(SDPBackend.MATH):
                math = model(x)
        fused.float().mean().backward()
        assert (fused.float() - math.float()).abs().max() < 0.05


@pytest.mark.parametrize("size", ["T", "B"])
def test_fast_equals_reference_on_cuda(size):
    """The fast path (head dims padded to a multiple of 8 inside the qkv weights, fused SDPA kernels) equals the
    reference formulation in fp32, and stays close in bf16; gradients too."""
    from test_fast_paths import sharpen

    from edtir.models.edt import attention_mode

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = sharpen(edtir.build_model(size, ["sr-x2"], depths=(2, 2), drop_path=0.0)).cuda()
    x = torch.rand(2, 3, 48, 72, device="cuda")
    out, grads = {}, {}
    for path in ("reference", "fast"):
        model.zero_grad()
        with attention_mode(path):
            y = model(x)
            (y * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                out[path + "16"] = model(x).float()
        out[path] = y.detach()
        grads[path] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert (out["fast"] - out["reference"]).abs().max() <= 1e-4
    assert (out["fast16"] - out["reference"]).abs().max() < 0.05
    for name, g in grads["reference"].items():  # a weight's gradient sums ~1e4 products: relative, in norm
        assert (grads["fast"][name] - g).norm() / g.norm().clamp_min(1e-3) <= 1e-4, name
