"""edtir restore / demo: the practitioner's path, on the bundled Kodak crop and on real data."""

import numpy as np
import pytest
from PIL import Image

import edtir
from edtir.cli import main
from edtir.commands.demo import SAMPLE
from edtir.data.io import read_image


def test_restore_bicubic_matches_imresize(tmp_path, capsys):
    src = tmp_path / "lr.png"
    lr = edtir.imresize(read_image(SAMPLE), 1 / 2)
    Image.fromarray(lr).save(src)
    out = tmp_path / "sr.png"
    assert main(["restore", str(src), "--model", "bicubic", "--task", "sr-x2", "-o", str(out)]) == 0
    np.testing.assert_array_equal(read_image(out), edtir.imresize(lr, 2))
    # never overwrites an existing output without --overwrite, and never an input
    before = out.read_bytes()
    assert main(["restore", str(src), "--model", "bicubic", "--task", "sr-x2", "-o", str(out)]) == 1
    assert out.read_bytes() == before
    assert "exists" in capsys.readouterr().out
    assert main(["restore", str(src), "--model", "identity", "--task", "denoise-15", "-o", str(src),
                 "--overwrite"]) == 1
    assert read_image(src).shape == lr.shape


def test_restore_folder_with_a_bad_file_and_a_checkpoint(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    crop = read_image(SAMPLE)[:50, :70]
    Image.fromarray(crop).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    weights = tmp_path / "t.safetensors"
    edtir.save_model(edtir.build_model("T", ["sr-x2"], depths=(2,)), weights)
    rc = main(["restore", str(folder), "--weights", str(weights), "-o", str(tmp_path / "out")])
    assert rc == 1  # one image failed, the other was written
    out = read_image(tmp_path / "out" / "a_sr-x2.png")
    assert out.shape == (100, 140, 3)  # any size in: padded to the size multiple and cropped back
    assert "b.png" in capsys.readouterr().out
    assert not list((tmp_path / "out").glob(".*tmp"))  # no half-written temporaries left


def test_restore_usage_errors(tmp_path, capsys):
    src = tmp_path / "x.png"
    Image.fromarray(read_image(SAMPLE)[:30, :30]).save(src)
    assert main(["restore", str(src), "--model", "nosuch", "--task", "sr-x2"]) == 2
    assert main(["restore", str(src), "--model", "bicubic", "--task", "denoise-25"]) == 2
    assert main(["restore", str(tmp_path / "missing.png"), "--model", "bicubic", "--task", "sr-x2"]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'nosuch'" in err and "missing.png" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["restore", str(src), "--task", "sr-x2"])  # neither --model nor --weights
    assert e.value.code == 2


def test_demo_writes_outputs_and_beats_nothing_silently(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bicubic" in out and "PSNR" in out
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "kodim23_hr.png" in pngs and any("bicubic" in p for p in pngs) and len(pngs) == 4
    hr = read_image(tmp_path / "kodim23_hr.png")
    bic = read_image(next(tmp_path.glob("*bicubic.png")))
    assert bic.shape == hr.shape
    assert edtir.psnr(bic, hr, 2, True) > 30  # the sample is a real photo: bicubic x2 is well above 30 dB


def test_bundled_model_is_the_demo_default_and_beats_bicubic_on_set5(data_dir):
    from edtir import zoo
    from edtir.evaluate import evaluate_folder

    assert zoo.default_model() == "edt-t-sr-x2-291"
    model = zoo.get_model("edt-t-sr-x2-291")
    assert model.info.size == "T" and model.tasks == ("sr-x2",)
    ours = evaluate_folder(model, "sr-x2", data_dir / "Set5", progress=False)
    bicubic = evaluate_folder(zoo.get_model("bicubic", task="sr-x2"), "sr-x2", data_dir / "Set5", progress=False)
    assert abs(ours["psnr"] - 33.7718) < 0.01  # the figure in the README and registry (measured on an H200)
    assert ours["psnr"] > bicubic["psnr"] + 0.05
