"""Task protocols, the runner, published baseline rows, and the ``edtir eval`` command."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from edtir import imresize, psnr, ssim
from edtir.baselines import BASELINES, get_baseline
from edtir.cli import main
from edtir.data.io import list_images, read_image, write_image
from edtir.errors import UsageError
from edtir.evaluate import evaluate_folder, modcrop, samples

# Published bicubic rows (MATLAB), evaluation.md: (PSNR, SSIM) on Y, crop = scale.
PUBLISHED_SET5 = {2: (33.66, 0.9299), 3: (30.39, 0.8682), 4: (28.42, 0.8104)}


def rng_image(seed, h, w):
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(x / 5.0 + seed) * np.cos(y / 7.0)
    noise = np.random.default_rng(seed).normal(0, 12, (h, w, 3))
    return np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_matches_published_set5(data_dir, scale):
    r = evaluate_folder(get_baseline("bicubic", f"sr-x{scale}"), f"sr-x{scale}", data_dir / "Set5", progress=False)
    want_psnr, want_ssim = PUBLISHED_SET5[scale]
    assert r["images"] == 5 and r["dataset"] == "Set5" and r["model"] == "bicubic" and not r["failed"]
    assert abs(r["psnr"] - want_psnr) <= 0.03, r["psnr"]
    assert abs(r["ssim"] - want_ssim) <= 0.001, r["ssim"]


@pytest.mark.slow
def test_identity_on_rain100l(data_dir):
    r = evaluate_folder(get_baseline("identity", "derain-light"), "derain-light", data_dir / "Rain100L",
                        progress=False)
    assert r["images"] == 100
    assert abs(r["psnr"] - 26.90) < 0.02 and abs(r["ssim"] - 0.838) < 0.002


def test_sr_protocol_by_hand(tmp_path):
    hr = rng_image(1, 50, 37)
    write_image(tmp_path / "a.png", hr)
    r = evaluate_folder(get_baseline("bicubic"), "sr-x3", tmp_path, progress=False, save_dir=tmp_path / "out")
    gt = hr[:48, :36]  # modcrop to a multiple of 3
    sr = imresize(imresize(gt, 1 / 3), 3)
    assert np.array_equal(read_image(tmp_path / "out" / "a.png"), sr)
    assert r["psnr"] == pytest.approx(psnr(sr, gt, crop_border=3, y_channel=True), abs=1e-12)
    assert r["ssim"] == pytest.approx(ssim(sr, gt, crop_border=3, y_channel=True), abs=1e-12)
    assert r["rows"][0]["name"] == "a.png"
    assert modcrop(hr, 4).shape == (48, 36, 3)


def test_denoise_noise_follows_the_edt_release(data_dir):
    # The EDT release: np.random.seed(0) once, then per image in sorted order noise of the image's shape.
    files = list_images(data_dir / "Set5")
    np.random.seed(0)
    want = [read_image(f).astype(np.float64) + np.random.normal(0, 25, read_image(f).shape) for f in files]
    got = [s.input[0].permute(1, 2, 0).numpy().astype(np.float64) * 255 for s in samples("denoise-25",
                                                                                         data_dir / "Set5")]
    assert len(got) == 5
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() < 1e-3  # float32 input; neither clipped nor rounded
    assert min(g.min() for g in got) < 0 and max(g.max() for g in got) > 255


def test_denoise_identity_is_reproducible_and_rgb(tmp_path):
    gt = rng_image(2, 40, 40)
    write_image(tmp_path / "x.png", gt)
    ident = get_baseline("identity", "denoise-50")
    a = evaluate_folder(ident, "denoise-50", tmp_path, progress=False)
    b = evaluate_folder(ident, "denoise-50", tmp_path, progress=False)
    assert a["psnr"] == b["psnr"]
    noisy = gt + np.random.RandomState(0).normal(0, 50, gt.shape)
    out = np.clip(np.round(noisy), 0, 255).astype(np.uint8)  # clamped and rounded before metrics
    assert a["psnr"] == pytest.approx(psnr(out, gt), abs=1e-4)  # RGB, no crop


def test_derain_pairs_by_name(tmp_path):
    for name, seed in (("1.png", 3), ("2.png", 4)):
        write_image(tmp_path / "clean" / name, rng_image(seed, 30, 20))
        write_image(tmp_path / "rainy" / name, rng_image(seed + 10, 30, 20))
    write_image(tmp_path / "clean" / "3.png", rng_image(5, 30, 20))  # no rainy pair
    r = evaluate_folder(get_baseline("identity"), "derain-heavy", tmp_path, progress=False)
    assert r["images"] == 2 and len(r["failed"]) == 1 and "3.png" in r["failed"][0]
    want = np.mean([psnr(read_image(tmp_path / "rainy" / n), read_image(tmp_path / "clean" / n), y_channel=True)
                    for n in ("1.png", "2.png")])
    assert r["psnr"] == pytest.approx(want, abs=1e-12)
    # SR on a paired folder reads its clean/ images.
    assert evaluate_folder(get_baseline("bicubic"), "sr-x2", tmp_path, progress=False)["images"] == 3


def test_runner_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        evaluate_folder(get_baseline("identity"), "sr-x2", tmp_path / "missing", progress=False)
    with pytest.raises(UsageError, match="no images"):
        evaluate_folder(get_baseline("identity"), "sr-x2", tmp_path, progress=False)
    with pytest.raises(UsageError, match="rainy/ and clean/"):
        evaluate_folder(get_baseline("identity"), "derain-light", tmp_path, progress=False)
    with pytest.raises(UsageError, match="does not do task"):
        evaluate_folder(get_baseline("bicubic", "sr-x2"), "sr-x3", tmp_path, progress=False)


def test_baselines_look_like_edt_models():
    assert set(BASELINES) >= {"bicubic", "identity"}
    b = get_baseline("bicubic", "sr-x4")
    assert b.tasks == ("sr-x4",) and b.scale() == 4 and b.size_multiple() == 1
    assert b.info.arch == "bicubic" and b.info.params == 0 and b.info.scales == {"sr-x4": 4}
    i = get_baseline("identity")
    assert "denoise-25" in i.tasks and i.scale("derain-light") == 1 and i.scale("sr-x2") == 2
    x = torch.rand(2, 3, 5, 6)
    assert torch.equal(i(x, task="denoise-15"), x) and i(x, task="sr-x3").shape == (2, 3, 15, 18)
    with pytest.raises(UsageError):
        get_baseline("bicubic", "denoise-25")
    with pytest.raises(UsageError):
        get_baseline("lanczos")


# -- the command -------------------------------------------------------------------------------------------

def small_set(folder, n=2, bad=False):
    for k in range(n):
        write_image(folder / f"im{k}.png", rng_image(k, 40 + 4 * k, 36))
    if bad:
        (folder / "broken.png").write_bytes(b"not a png")
    return folder


def one_line_error(err: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if "%|" not in ln]
    assert "Traceback" not in err
    assert lines and all(ln.startswith("edtir eval") for ln in lines), err


def test_cli_eval_table_json_and_csv(tmp_path, capsys):
    data = small_set(tmp_path / "Tiny")
    rc = main(["eval", "--task", "sr-x2", "--model", "bicubic", "--data", str(data), "--json",
               str(tmp_path / "r.json"), "--per-image", str(tmp_path / "r.csv"), "--save-dir", str(tmp_path / "o"),
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "PSNR" in out and "SSIM" in out and "Tiny" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    [row] = doc["results"]
    assert row.keys() == {"task", "dataset", "model", "psnr", "ssim", "images"}
    assert (row["task"], row["dataset"], row["model"], row["images"]) == ("sr-x2", "Tiny", "bicubic", 2)
    assert math.isfinite(row["psnr"]) and 0 < row["ssim"] <= 1
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["image"] for r in rows] == ["im0.png", "im1.png"]
    assert np.mean([float(r["psnr"]) for r in rows]) == pytest.approx(row["psnr"], abs=1e-5)
    assert sorted(p.name for p in (tmp_path / "o" / "Tiny").iterdir()) == ["im0.png", "im1.png"]


@pytest.mark.parametrize("argv,needle", [
    (["--task", "sr-x5", "--model", "bicubic"], "unknown task"),
    (["--task", "denoise-25", "--model", "bicubic"], "does not do task"),
    (["--task", "sr-x2", "--model", "nosuchmodel"], "unknown model"),
    (["--task", "derain-light", "--model", "identity"], "rainy/ and clean/"),
    (["--task", "sr-x2", "--model", "bicubic", "--tile", "0"], "--tile"),
])
def test_cli_usage_errors_exit_2(tmp_path, capsys, argv, needle):
    data = small_set(tmp_path / "d", n=1)
    assert main(["eval", *argv, "--data", str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err
    one_line_error(err)
    assert needle in err


def test_cli_missing_folder_and_unknown_flag(tmp_path, capsys):
    assert main(["eval", "--task", "sr-x2", "--model", "bicubic", "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    one_line_error(err)
    assert "nope" in err and "does not exist" in err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--task", "sr-x2", "--model", "bicubic", "--data", str(tmp_path), "--frobnicate"])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_failed_images_exit_1_and_the_rest_is_scored(tmp_path, capsys):
    data = small_set(tmp_path / "Mixed", n=2, bad=True)
    rc = main(["eval", "--task", "sr-x2", "--model", "bicubic", "--data", str(data), "--json",
               str(tmp_path / "r.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    one_line_error(err)
    assert "broken.png" in err
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["images"] == 2
    # A set where nothing could be scored: exit 1, and valid JSON (null, not NaN).
    bad = tmp_path / "Bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"\x89PNG garbage")
    assert main(["eval", "--task", "sr-x2", "--model", "bicubic", "--data", str(bad), "--json",
                 str(tmp_path / "b.json"), "--no-progress"]) == 1
    [row] = json.loads((tmp_path / "b.json").read_text())["results"]
    assert row["images"] == 0 and row["psnr"] is None and row["ssim"] is None
    one_line_error(capsys.readouterr().err)


def test_cli_weights_without_the_task_and_a_tiled_edt_run(tmp_path, capsys):
    from edtir.models.checkpoint import save_model
    from edtir.models.edt import build_model

    torch.manual_seed(0)
    save_model(build_model("T", ["sr-x2"]), tmp_path / "t.safetensors")
    data = tmp_path / "d"
    write_image(data / "x.png", rng_image(7, 52, 60))  # LR 26x30: padded to 48x48, two tiles of 24
    assert main(["eval", "--task", "sr-x3", "--weights", str(tmp_path / "t.safetensors"), "--data", str(data),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    one_line_error(err)
    assert "sr-x3" in err
    rc = main(["eval", "--task", "sr-x2", "--weights", str(tmp_path / "t.safetensors"), "--data", str(data),
               "--tile", "24", "--tile-overlap", "8", "--json", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0
    [row] = json.loads((tmp_path / "r.json").read_text())["results"]
    assert row["model"] == "t.safetensors" and row["images"] == 1 and math.isfinite(row["psnr"])
