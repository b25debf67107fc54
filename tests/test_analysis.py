"""The analysis toolkit: CKA (linear, RBF, minibatch), feature capture of EDT layers, model-vs-model CKA, LAM
and the diffusion index, and the ``edtir cka`` / ``edtir lam`` commands."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from edtir.analysis import (
    FeatureCapture,
    MinibatchCKA,
    capture_features,
    compare_models,
    diffusion_index,
    gini,
    input_crops,
    lam,
    layer_names,
    linear_cka,
    minibatch_cka,
    rbf_cka,
)
from edtir.analysis.cka import hsic_unbiased
from edtir.analysis.compare import batched
from edtir.analysis.lam import DifferentiableBicubic, blur_path, window_objective
from edtir.baselines import bicubic_upscale, get_baseline
from edtir.cli import main
from edtir.data.io import read_image, uint8_to_tensor
from edtir.errors import UsageError
from edtir.models.edt import build_model


def closed_form_cka(x, y):
    """Kornblith et al.'s linear CKA written out in numpy: columns centred, Frobenius norms."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def rbf_cka_reference(x, y, threshold=0.5):
    """Kornblith et al.'s published numpy recipe (gram_rbf, center_gram, cka), rewritten independently."""
    def gram_rbf(a):
        dot = a @ a.T
        sq = np.diag(dot)
        d = -2 * dot + sq[:, None] + sq[None, :]
        return np.exp(-d / (2 * threshold ** 2 * np.median(d)))

    def centre(g):
        n = g.shape[0]
        h = np.eye(n) - np.ones((n, n)) / n
        return h @ g @ h

    k, l = centre(gram_rbf(x)), centre(gram_rbf(y))
    return (k * l).sum() / (np.linalg.norm(k) * np.linalg.norm(l))


def random_pair(seed, n, p1, p2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p1))
    y = np.tanh(x @ rng.normal(size=(p1, p2))) + 0.5 * rng.normal(size=(n, p2))
    return x, y


@pytest.fixture(scope="module")
def zebra():
    """A 48x48 crop of Set14's zebra (stripes: texture in every window), as a (1, 3, 48, 48) tensor."""
    from conftest import DATA, need

    img = read_image(need(DATA / "Set14" / "zebra.png"))[100:148, 200:248]
    return uint8_to_tensor(img)


@pytest.fixture(scope="module")
def tiny():
    """A small EDT (2 stages of 2 blocks) with random weights: real layers, fast on the CPU."""
    torch.manual_seed(0)
    return build_model("T", ["sr-x2"], depths=(2, 2), drop_path=0.0).eval()


# ---------------------------------------------------------------------------------------------------------------
# CKA
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,p", [(200, 30), (20, 300)])  # feature-space path and Gram path
def test_linear_cka_equals_closed_form(n, p):
    x, y = random_pair(1, n, p, p // 3 + 1)
    want = closed_form_cka(x, y)
    assert 0.05 < want < 0.95
    assert linear_cka(x, y) == pytest.approx(want, abs=1e-12)
    assert linear_cka(torch.from_numpy(x).float(), torch.from_numpy(y)) == pytest.approx(want, abs=1e-6)
    assert linear_cka(y, x) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("n,p", [(200, 30), (20, 300)])
def test_linear_cka_invariances(n, p):
    rng = np.random.default_rng(2)
    x, y = random_pair(2, n, p, 7)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)   # orthogonal transform
    assert linear_cka(3.7 * x, y) == pytest.approx(base, abs=1e-10)  # isotropic scaling
    assert linear_cka(x + 5.0, y) == pytest.approx(base, abs=1e-10)  # centred inside
    assert linear_cka(x @ q * 0.01, x) == pytest.approx(1.0, abs=1e-10)
    a = rng.normal(size=(p, p)) @ np.diag(np.geomspace(1, 100, p))  # invertible, not orthogonal
    assert abs(linear_cka(x @ a, x) - 1.0) > 0.05
    assert abs(linear_cka(x @ a, y) - base) > 0.01


def test_rbf_cka():
    x, y = random_pair(3, 60, 12, 5)
    assert rbf_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert rbf_cka(x, y) == pytest.approx(rbf_cka_reference(x, y), abs=1e-10)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(12, 12)))
    assert rbf_cka(2.5 * x @ q, y) == pytest.approx(rbf_cka(x, y), abs=1e-10)
    assert rbf_cka(x, y, sigma=1.0) != pytest.approx(rbf_cka(x, y), abs=1e-3)


def test_cka_rejects_mismatched_samples():
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(np.zeros((5, 3)), np.zeros((6, 3)))
    with pytest.raises(ValueError, match="at least 4"):
        minibatch_cka([np.ones((3, 2))], [np.ones((3, 2))])


def test_unbiased_hsic_estimates_the_population_value():
    # x ~ N(0, I), y = x A + noise: the population HSIC of linear kernels is ||Cov(x, y)||²_F = ||A||²_F.
    rng = np.random.default_rng(4)
    a = rng.normal(size=(6, 4))
    est = []
    for _ in range(400):
        x = rng.normal(size=(16, 6))
        y = x @ a + rng.normal(size=(16, 4))
        k, l = torch.from_numpy(x @ x.T)[None], torch.from_numpy(y @ y.T)[None]
        est.append(float(hsic_unbiased(k, l)[0, 0]))
    assert np.mean(est) == pytest.approx(np.linalg.norm(a) ** 2, rel=0.05)


def test_minibatch_cka_approaches_full_batch():
    x, y = random_pair(5, 8000, 10, 6)
    full = linear_cka(x, y)
    xb, yb = np.split(x, 250), np.split(y, 250)  # batches of 32
    mb = minibatch_cka(xb, yb)
    assert mb == pytest.approx(full, abs=0.01)
    # An average of per-batch CKAs keeps each small batch's upward bias: far off.
    naive = np.mean([linear_cka(a, b) for a, b in zip(xb, yb, strict=True)])
    assert naive - full > 0.05
    # Several layers at once give the same numbers as one pair at a time.
    acc = MinibatchCKA()
    for a, b in zip(xb[:20], yb[:20], strict=True):
        acc.update([a, a[:, :5]], [b])
    m = acc.result()
    assert m.shape == (2, 1) and acc.samples == 640 and acc.batches == 20
    assert m[1, 0] == pytest.approx(minibatch_cka([a[:, :5] for a in xb[:20]], yb[:20]), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Feature capture
# ---------------------------------------------------------------------------------------------------------------

def test_layer_names_of_edt_t():
    names = layer_names(build_model("T", ["sr-x2", "denoise-25"]), "sr-x2")
    assert names[:5] == ["head.conv0", "head.block1", "head.block2", "head.conv3", "stage1.block1.attn"]
    assert names[-5:] == ["stage4", "body", "tail.block0", "tail.block1", "tail.up2"]  # pixelshuffledirect
    assert len(names) == 4 + 4 * (2 * 6 + 1) + 1 + 3 and len(set(names)) == len(names)
    names_b = layer_names(build_model("B", ["sr-x2"]), "sr-x2")
    assert names_b[-2:] == ["tail.up2", "tail.conv3"]  # pixelshuffle: upsampler then a last conv
    assert layer_names(build_model("T", ["denoise-25"]))[-1] == "tail.conv2"


def test_capture_hooks_the_right_tensors(tiny, zebra):
    with torch.no_grad():
        ref = tiny(zebra, "sr-x2")
        f = capture_features(tiny, zebra, "sr-x2")
        assert torch.equal(tiny(zebra, "sr-x2"), ref)  # hooks are gone, output unchanged
    assert list(f) == layer_names(tiny, "sr-x2")
    blk = tiny.body.layers[0].residual_group.blocks[1]
    with torch.no_grad():
        # The FFN residual is the attention residual plus the FFN of it.
        want = f["stage1.block2.attn"] + blk.mlp(blk.norm2(f["stage1.block2.attn"]))
        assert torch.allclose(f["stage1.block2.ffn"], want, atol=1e-5)
        # A stage adds its input (the previous stage's output) to its last block's output.
        assert torch.allclose(f["stage2"], f["stage2.block2.ffn"] + f["stage1"], atol=1e-5)
        head, _ = tiny.head("sr-x2", zebra)
        assert torch.allclose(f["head.conv3"], head) and torch.allclose(f["body"], tiny.body(head), atol=1e-5)
    assert f["stage1.block1.attn"].shape == (1, 48, 48, 60) and f["tail.up2"].shape == (1, 3, 96, 96)


def test_capture_errors(tiny):
    with pytest.raises(UsageError, match="bicubic has no layers"):
        layer_names(get_baseline("bicubic", "sr-x2"), "sr-x2")
    with pytest.raises(UsageError, match="no layer 'stage9'"):
        FeatureCapture(tiny, "sr-x2", names=["stage9"])
    with pytest.raises(UsageError, match="not in this model"):
        layer_names(tiny, "denoise-25")


def test_compare_models_on_real_crops(tiny, data_dir):
    crops = input_crops("sr-x2", data_dir / "Set5", 12, 24, seed=0)
    assert len(crops) == 12 and crops[0].shape == (3, 24, 24)
    assert input_crops("sr-x2", data_dir / "Set5", 12, 24, seed=0)[3].equal(crops[3])  # seeded
    batches = batched(crops, 6)
    self_sim = compare_models(tiny, tiny, "sr-x2", batches)
    assert self_sim.layers_a == self_sim.layers_b == layer_names(tiny, "sr-x2")
    assert np.allclose(np.diag(self_sim.matrix), 1.0, atol=1e-12) and self_sim.samples == 12
    # B: the first head conv's weights and bias doubled. Its output is A's times 2 (CKA 1: isotropic scaling);
    # the leaky ReLUs and the residuals after it see a different input (CKA < 1).
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.head_sr_x2[0].weight.mul_(2.0)
        other.head_sr_x2[0].bias.mul_(2.0)
    r = compare_models(tiny, other, "sr-x2", batches)
    diag = dict(r.corresponding())
    assert diag["head.conv0"] == pytest.approx(1.0, abs=1e-9)
    assert diag["stage1"] < 0.999 and diag["body"] < 0.999
    torch.manual_seed(5)  # a model with other random weights: far from A inside the body
    far = dict(compare_models(tiny, build_model("T", ["sr-x2"], depths=(2, 2)).eval(), "sr-x2", batches)
               .corresponding())
    assert far["stage2"] < 0.9 and far["body"] < diag["body"]
    doc = r.to_json()
    assert len(doc["matrix"]) == len(doc["layers_a"]) and len(doc["matrix"][0]) == len(doc["layers_b"])


# ---------------------------------------------------------------------------------------------------------------
# LAM
# ---------------------------------------------------------------------------------------------------------------

def test_gini_and_di():
    assert gini(np.ones(100)) == pytest.approx(0.0, abs=1e-9)
    one_hot = np.zeros(100)
    one_hot[7] = 1.0
    assert gini(one_hot) == pytest.approx(0.99, abs=1e-5)
    assert diffusion_index(np.ones((10, 10))) == pytest.approx(100.0, abs=1e-6)


def test_blur_path_ends_at_the_input_and_sums_to_the_difference(zebra):
    imgs, ders = blur_path(zebra, sigma=1.2, steps=50)
    assert imgs.shape == (50, 3, 48, 48)
    assert torch.allclose(imgs[-1], zebra.double(), atol=1e-9)
    start = blur_path(zebra, sigma=1.2, steps=1)[0][0]  # one step: kernel 1 of linspace(1.2, 0, 2) -> σ = 0
    assert torch.allclose(start, zebra.double(), atol=1e-9)
    # The mean of the path derivatives telescopes to x - blur(x, σ=1.2).
    from edtir.analysis.lam import filter2d, gaussian_kernel

    want = zebra.double() - filter2d(zebra.double(), gaussian_kernel(9, 1.2))
    assert torch.allclose(ders.mean(0, keepdim=True), want, atol=1e-9)


def test_lam_of_one_conv_stays_in_its_receptive_field(zebra):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    x0, y0, size = 20, 14, 8
    r = lam(conv, zebra, (x0, y0, size), steps=20)
    # The objective reads output rows y0..y0+size and columns x0..x0+size (finite differences); a 3x3 conv
    # sees one more pixel on each side.
    inside = np.zeros_like(r.attribution, dtype=bool)
    inside[y0 - 1:y0 + size + 2, x0 - 1:x0 + size + 2] = True
    assert np.all(r.attribution[~inside] == 0.0)
    assert (r.attribution[inside] > 0).mean() > 0.8 and r.attribution.max() == 1.0
    assert r.scale == 1 and len(r.objective) == 20
    # Four stacked convs see 4 pixels around: the attribution spreads, DI grows.
    torch.manual_seed(0)
    deep = nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=1) for _ in range(4)])
    r4 = lam(deep, zebra, (x0, y0, size), steps=20)
    assert np.any(r4.attribution[~inside] > 0)
    assert r4.di > r.di


def test_lam_completeness_on_a_linear_model(zebra):
    # Integrated gradients: the attributions sum to F(input) - F(path start), up to the Riemann sum's error.
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    win = (10, 10, 16)
    r = lam(conv, zebra, win, steps=50)
    from edtir.analysis.lam import filter2d, gaussian_kernel

    with torch.no_grad():
        start = filter2d(zebra.double(), gaussian_kernel(9, 1.2)).float()
        delta = float(window_objective(conv(zebra), *win)[0] - window_objective(conv(start), *win)[0])
    assert r.gradient.sum() == pytest.approx(delta, rel=0.05)


def test_lam_bicubic_baseline(zebra):
    noisy = zebra + 0.01 * torch.randn_like(zebra)  # off the uint8 grid: the baseline's float path
    assert torch.allclose(DifferentiableBicubic(2)(noisy.double()), bicubic_upscale(noisy.double(), 2), atol=1e-12)
    model = get_baseline("bicubic", "sr-x2")
    r = lam(model, zebra, (40, 30, 16), "sr-x2", steps=10)
    assert r.scale == 2 and r.output.shape == (3, 96, 96)
    ys, xs = np.nonzero(r.attribution)
    # Window LR rows 15..23.5, columns 20..28.5; bicubic taps reach 2 LR pixels further.
    assert ys.min() >= 13 and ys.max() <= 26 and xs.min() >= 18 and xs.max() <= 31
    with pytest.raises(UsageError, match="does not fit"):
        lam(model, zebra, (90, 0, 16), "sr-x2")


def test_lam_edt_and_flat_window(tiny, zebra):
    r = lam(tiny, zebra[..., :30, :30], (10, 10, 16), "sr-x2", steps=4, batch=2)  # padded to 48 inside
    assert r.attribution.shape == (30, 30) and r.output.shape == (3, 60, 60) and 0 < r.di < 100
    from edtir.errors import EdtirError

    with pytest.raises(EdtirError, match="zero everywhere"):
        lam(nn.Conv2d(3, 3, 3, padding=1), torch.full((1, 3, 32, 32), 0.5), (8, 8, 8), steps=2)


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------

def test_cka_command(tmp_path, tiny, data_dir, capsys):
    from edtir.models.checkpoint import save_model

    a = save_model(tiny, tmp_path / "a.safetensors")
    torch.manual_seed(1)
    b = save_model(build_model("T", ["sr-x2"], depths=(2, 2)), tmp_path / "b.safetensors")
    out, js = tmp_path / "cka.png", tmp_path / "cka.json"
    rc = main(["cka", "--a", str(a), "--b", str(b), "--task", "sr-x2", "--data", str(data_dir / "Set5"),
               "--batches", "2", "--batch-size", "4", "--crop", "24", "--out", str(out), "--json", str(js),
               "--no-progress"])
    assert rc == 0
    doc = json.loads(js.read_text())
    assert doc["layers_a"] == doc["layers_b"] == layer_names(tiny, "sr-x2")
    m = np.array(doc["matrix"], dtype=float)
    assert m.shape == (len(doc["layers_a"]),) * 2 and np.all(m > -0.5) and np.all(m < 1.0 + 1e-9)
    assert doc["samples"] == 8 and doc["batches"] == 2
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = main(["cka", "--a", str(a), "--task", "sr-x2", "--data", str(data_dir / "Set5"), "--batches", "1",
               "--batch-size", "4", "--crop", "24", "--json", str(js), "--no-progress"])
    assert rc == 0 and np.allclose(np.diag(np.array(json.loads(js.read_text())["matrix"], float)), 1.0)


@pytest.mark.parametrize("argv,msg", [
    (["--a", "bicubic"], "bicubic has no layers"),
    (["--a", "nope.safetensors"], "does not exist"),
    (["--a", "A", "--batch-size", "3"], "--batch-size must be >= 4"),
    (["--a", "A", "--out", "x.gif"], "unsupported figure format"),
    (["--a", "A", "--data", "/nonexistent"], "does not exist"),
    (["--a", "A", "--crop", "30"], "not a multiple of 24"),
])
def test_cka_command_errors(tmp_path, tiny, data_dir, capsys, argv, msg):
    from edtir.models.checkpoint import save_model

    a = str(save_model(tiny, tmp_path / "a.safetensors"))
    argv = [a if v == "A" else v for v in argv]
    if "--data" not in argv:
        argv += ["--data", str(data_dir / "Set5")]
    rc = main(["cka", "--task", "sr-x2", "--json", str(tmp_path / "c.json"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_lam_command(tmp_path, data_dir, capsys):
    out, js, npy = tmp_path / "lam.png", tmp_path / "lam.json", tmp_path / "map.npy"
    rc = main(["lam", "--model", "bicubic", "--task", "sr-x2", "--image", str(data_dir / "Set14" / "zebra.png"),
               "--degrade", "--crop", "200,100,96,96", "--window", "40,40,16", "--steps", "10", "--out", str(out),
               "--json", str(js), "--save-map", str(npy), "--no-progress"])
    assert rc == 0
    doc = json.loads(js.read_text())
    assert doc["model"] == "bicubic" and doc["input_size"] == [48, 48] and doc["scale"] == 2
    assert 0 < doc["diffusion_index"] < 5 and doc["steps"] == 10 and doc["sigma"] == 1.2
    amap = np.load(npy)
    assert amap.shape == (48, 48) and amap.max() == pytest.approx(1.0)
    assert doc["diffusion_index"] == pytest.approx(diffusion_index(amap), abs=1e-3)
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra,msg", [
    (["--window", "40,40"], "--window expects 3 integers"),
    (["--window", "90,0,16"], "does not fit"),
    (["--crop", "0,0,9999,10"], "does not fit in the"),
    (["--task", "denoise-25"], "does not do task"),
    (["--steps", "0"], "--steps and --batch must be >= 1"),
])
def test_lam_command_errors(tmp_path, data_dir, capsys, extra, msg):
    argv = ["lam", "--model", "bicubic", "--task", "sr-x2", "--image", str(data_dir / "Set5" / "bird.png"),
            "--degrade", "--crop", "0,0,96,96", "--window", "4,4,8", "--json", str(tmp_path / "l.json"),
            "--no-progress"]
    for i in range(0, len(extra), 2):
        if extra[i] in argv:
            argv[argv.index(extra[i]) + 1] = extra[i + 1]
        else:
            argv += extra[i:i + 2]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
