"""edtir restore, the Python API and the demo: every kind of input made from real image crops, what comes out
(size, grey, alpha, 16 bits), outputs that are never overwritten or half-written, bad inputs in a batch, and the
default bundled model of a task. A small EDT in a temporary zoo (EDTIR_ZOO) stands in for the bundled models so
these tests run in seconds; tests/test_zoo.py checks the real ones."""

import errno
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

import edtir
from edtir.cli import main
from edtir.commands.demo import SAMPLE
from edtir.data.io import PNG_SIGNATURE, Picture, read_image, read_picture, write_picture
from edtir.errors import ImageError, UsageError
from edtir.inference import restore as engine

TASKS = ["sr-x2", "sr-x4", "denoise-25"]


def entry(file, tasks, default_for):
    return {"file": file, "arch": "EDT-T", "params": 0, "tasks": tasks, "default_for": default_for,
            "description": "a 2-block EDT-T with random weights (tests)", "data": "none", "steps": 0,
            "recipe": {"config": "none", "command": "none"}, "scores": {}}


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    """A zoo with one small multi-task model ('tiny', fp16 like the bundled ones), default for sr-x2, sr-x4 and
    denoise-25."""
    d = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    model = edtir.build_model("T", TASKS, depths=(2,))
    edtir.save_model(model.half(), d / "tiny.safetensors")
    (d / "registry.json").write_text(json.dumps({"tiny": entry("tiny.safetensors", TASKS, TASKS)}))
    return d


@pytest.fixture
def zoo(zoo_dir, monkeypatch):
    monkeypatch.setenv("EDTIR_ZOO", str(zoo_dir))
    return zoo_dir


@pytest.fixture(scope="module")
def crop():
    return read_image(SAMPLE)[100:140, 60:108]  # 40x48 of a real photo (Kodak 23)


def tiny():
    from edtir import zoo

    return zoo.get_model("tiny")


def png_ihdr(path):
    head = path.read_bytes()[:26]
    assert head.startswith(PNG_SIGNATURE)
    return head[24], head[25]  # bit depth, colour type


def make_inputs(folder, rgb):
    """Every kind of input restore must take, from one real crop: {file name: (grey, alpha, bits, rotated)}."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    g, a = rgb[..., 1], (rgb[..., 0] // 2 + 100).astype(np.uint8)
    im = Image.fromarray(rgb)
    im.save(folder / "rgb.png")
    im.save(folder / "photo.jpg", quality=95)
    im.save(folder / "scan.tif")
    im.save(folder / "web.webp", lossless=True)
    im.save(folder / "old.bmp")
    im.convert("CMYK").save(folder / "print.jpg")
    im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(folder / "palette.png")
    im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(folder / "palette_t.png", transparency=0)
    Image.fromarray(g).save(folder / "grey.png")
    Image.fromarray(np.dstack([rgb, a])).save(folder / "rgba.png")
    Image.fromarray(np.dstack([g, a]), "LA").save(folder / "la.png")
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    im.save(folder / "rotated.jpg", exif=exif, quality=95)
    noise = np.random.default_rng(0).integers(0, 257, rgb.shape)
    deep = (rgb.astype(np.uint16) * 257 - noise.astype(np.uint16) * (rgb > 0)).astype(np.uint16)
    Image.fromarray(deep[..., 1]).save(folder / "grey16.png")  # mode I;16
    cv2.imwrite(str(folder / "deep.png"), deep[..., ::-1])  # 16-bit RGB by another writer than ours
    cv2.imwrite(str(folder / "deep_rgba.png"), np.dstack([deep[..., ::-1], deep[..., 0]]))
    return {"rgb.png": (False, False, 8, False), "photo.jpg": (False, False, 8, False),
            "scan.tif": (False, False, 8, False), "web.webp": (False, False, 8, False),
            "old.bmp": (False, False, 8, False), "print.jpg": (False, False, 8, False),
            "palette.png": (False, False, 8, False), "palette_t.png": (False, True, 8, False),
            "grey.png": (True, False, 8, False), "rgba.png": (False, True, 8, False),
            "la.png": (True, True, 8, False), "rotated.jpg": (False, False, 8, True),
            "grey16.png": (True, False, 16, False), "deep.png": (False, False, 16, False),
            "deep_rgba.png": (False, True, 16, False)}, deep


# ------------------------------------------------------------------------------------------------------------
# Every kind of input
# ------------------------------------------------------------------------------------------------------------

def test_every_kind_of_input_keeps_grey_alpha_and_bits(zoo, crop, tmp_path, capsys):
    kinds, _ = make_inputs(tmp_path / "in", crop)
    out = tmp_path / "out"
    assert main(["restore", str(tmp_path / "in"), "--task", "sr-x2", "-o", str(out)]) == 0
    assert "model tiny" in capsys.readouterr().out  # the task's default bundled model
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n.split('.')[0]}_sr-x2.png" for n in kinds)
    h, w = crop.shape[:2]
    for name, (grey, alpha, bits, rotated) in kinds.items():
        path = out / f"{name.split('.')[0]}_sr-x2.png"
        pic = read_picture(path)
        assert pic.rgb.shape[:2] == ((2 * w, 2 * h) if rotated else (2 * h, 2 * w)), name
        assert (pic.grey, pic.alpha is not None, pic.bits) == (grey, alpha, bits), name
        depth, ctype = png_ihdr(path)  # what the file itself says
        assert depth == bits and ctype == {(True, False): 0, (True, True): 4, (False, False): 2,
                                           (False, True): 6}[grey, alpha], name


def test_rgb_output_is_what_the_engine_and_eval_compute(zoo, crop, tmp_path):
    kinds, _ = make_inputs(tmp_path / "in", crop)
    out = tmp_path / "out"
    assert main(["restore", str(tmp_path / "in" / "rgb.png"), str(tmp_path / "in" / "grey.png"), "--task",
                 "sr-x2", "-o", str(out)]) == 0
    model = tiny()
    np.testing.assert_array_equal(read_image(out / "rgb_sr-x2.png"), engine(model, crop, task="sr-x2"))
    # grey: the model sees three equal channels; the output is their mean
    g3 = np.repeat(crop[..., 1:2], 3, axis=2).astype(np.float32) / 255
    y = engine(model, g3, task="sr-x2").mean(axis=2, dtype=np.float32)
    want = np.round(np.clip(y, 0, 1) * np.float32(255)).astype(np.uint8)
    np.testing.assert_array_equal(read_picture(out / "grey_sr-x2.png").array(), want)


def test_sixteen_bits_and_alpha_survive_exactly(crop, tmp_path):
    kinds, deep = make_inputs(tmp_path / "in", crop)
    # identity keeps every 16-bit value: read (OpenCV), float, back to 16 bits, our PNG writer, read again
    for name in ("deep.png", "grey16.png", "deep_rgba.png"):
        assert main(["restore", str(tmp_path / "in" / name), "--model", "identity", "--task", "denoise-25",
                     "-o", str(tmp_path / "id")]) == 0
    np.testing.assert_array_equal(read_picture(tmp_path / "id" / "deep_denoise-25.png").array(), deep)
    np.testing.assert_array_equal(read_picture(tmp_path / "id" / "grey16_denoise-25.png").array(), deep[..., 1])
    np.testing.assert_array_equal(read_picture(tmp_path / "id" / "deep_rgba_denoise-25.png").array(),
                                  np.dstack([deep, deep[..., 0]]))
    # SR: colour and alpha both by MATLAB bicubic
    assert main(["restore", str(tmp_path / "in" / "rgba.png"), "--model", "bicubic", "--task", "sr-x2",
                 "-o", str(tmp_path / "sr")]) == 0
    out = read_picture(tmp_path / "sr" / "rgba_sr-x2.png")
    src = read_picture(tmp_path / "in" / "rgba.png")
    np.testing.assert_array_equal(out.rgb, edtir.imresize(src.rgb, 2))
    np.testing.assert_array_equal(out.alpha, edtir.imresize(src.alpha, 2))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pil(crop, tmp_path, orientation):
    im = Image.fromarray(crop)
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    im.save(path, exif=exif, quality=90)
    want = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    np.testing.assert_array_equal(read_picture(path).rgb, want)
    np.testing.assert_array_equal(read_image(path), want)


def test_tiny_images_are_padded_not_refused(zoo, crop, tmp_path):
    for h, w in ((1, 1), (3, 2), (5, 30)):
        Image.fromarray(crop[:h, :w]).save(tmp_path / f"t{h}x{w}.png")
    assert main(["restore", str(tmp_path), "--task", "denoise-25", "-o", str(tmp_path / "out")]) == 0
    assert main(["restore", str(tmp_path / "t1x1.png"), "--task", "sr-x4", "-o", str(tmp_path / "out")]) == 0
    assert read_image(tmp_path / "out" / "t1x1_sr-x4.png").shape == (4, 4, 3)
    assert read_image(tmp_path / "out" / "t5x30_denoise-25.png").shape == (5, 30, 3)


# ------------------------------------------------------------------------------------------------------------
# Bad inputs: each reported in one line and skipped; the good ones processed; exit 1
# ------------------------------------------------------------------------------------------------------------

def png_with_size(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_no_progress_leaves_only_the_lines_per_image(zoo, crop, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(crop[:24, :32]).save(d / name)
    assert main(["restore", str(d), "--task", "sr-x2", "-o", str(tmp_path / "bar")]) == 0
    assert "2/2" in capsys.readouterr().err  # two images: a bar by default
    assert main(["restore", str(d), "--task", "sr-x2", "-o", str(tmp_path / "quiet"), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "2/2" not in cap.err and cap.err.strip() == ""
    assert cap.out.count("_sr-x2.png (") == 2  # one line per image


def test_a_batch_with_bad_files(zoo, crop, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(crop).save(d / "good.png")
    Image.fromarray(crop[:1, :1]).save(d / "dot.png")
    good = (d / "good.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "text.jpg").write_bytes(b"name,value\nnot an image,1\n")
    (d / "empty.png").write_bytes(b"")
    (d / "bomb.png").write_bytes(png_with_size(30000, 30000))  # 900 megapixels declared, 64 bytes of data
    Image.fromarray(crop[..., 0].astype(np.float32)).save(d / "float.tif")
    (d / "folder.png").mkdir()  # a folder with an image name: not an input
    (tmp_path / "empty_dir").mkdir()
    out = tmp_path / "out"
    rc = main(["restore", str(d), str(tmp_path / "missing.png"), str(tmp_path / "empty_dir"), "--task", "sr-x2",
               "-o", str(out)])
    cap = capsys.readouterr()
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == ["dot_sr-x2.png", "good_sr-x2.png"]  # nothing else, no tmp
    errors = [line for line in cap.err.splitlines() if "error:" in line]  # errors go to stderr
    assert "error:" not in cap.out
    for name, reason in (("truncated.png", "cannot decode"), ("text.jpg", "not an image"),
                         ("empty.png", "empty file"), ("bomb.png", "over the limit of 400,000,000"),
                         ("float.tif", "float pixels"), ("missing.png", "no such file"),
                         ("empty_dir", "no images")):
        assert sum(name in line and reason in line for line in errors) == 1, (name, errors)
    assert len(errors) == 7
    assert "Traceback" not in cap.out + cap.err


def test_pixel_limit_is_configurable(zoo, crop, tmp_path, monkeypatch, capsys):
    Image.fromarray(crop).save(tmp_path / "a.png")  # 48x40 = 1920 pixels
    args = ["restore", str(tmp_path / "a.png"), "--task", "denoise-25", "-o", str(tmp_path / "out")]
    assert main(args + ["--max-pixels", "1919"]) == 1
    assert "1,920 pixels, over the limit of 1,919" in capsys.readouterr().err
    monkeypatch.setenv("EDTIR_MAX_PIXELS", "1000")
    assert main(args) == 1
    assert "over the limit of 1,000" in capsys.readouterr().err
    assert main(args + ["--max-pixels", "1920"]) == 0  # the flag wins over the environment
    assert main(args + ["--max-pixels", "0"]) == 2
    with pytest.raises(ImageError, match="over the limit"):
        read_picture(tmp_path / "a.png")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes files whatever their permissions")
def test_unreadable_file_and_unwritable_folder(zoo, crop, tmp_path, capsys):
    Image.fromarray(crop).save(tmp_path / "a.png")
    os.chmod(tmp_path / "a.png", 0)
    assert main(["restore", str(tmp_path / "a.png"), "--task", "sr-x2", "-o", str(tmp_path / "o")]) == 1
    assert "permission denied" in capsys.readouterr().err
    os.chmod(tmp_path / "a.png", 0o644)
    (tmp_path / "ro").mkdir(mode=0o500)
    assert main(["restore", str(tmp_path / "a.png"), "--task", "sr-x2", "-o", str(tmp_path / "ro")]) == 1
    assert "cannot write" in capsys.readouterr().err


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_give_a_picture_or_one_image_error(tmp_path_factory, data):
    """Truncations and byte changes anywhere in real PNG/JPEG/TIFF/WebP files: never another exception."""
    crop = read_image(SAMPLE)[:24, :32]
    fmt = data.draw(st.sampled_from(["png", "jpeg", "tiff", "webp", "bmp"]))
    import io

    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format=fmt)
    raw = bytearray(buf.getvalue())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    for _ in range(data.draw(st.integers(0, 4))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("fuzz") / f"x.{fmt}"
    path.write_bytes(bytes(raw))
    try:
        pic = read_picture(path)
    except ImageError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
    else:
        assert pic.rgb.ndim == 3 and pic.rgb.shape[2] == 3 and min(pic.rgb.shape[:2]) >= 1


# ------------------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------------------

def test_outputs_are_never_overwritten_and_folders_are_checked_first(zoo, crop, tmp_path, capsys):
    src = tmp_path / "a.png"
    Image.fromarray(crop).save(src)
    out = tmp_path / "new" / "nested"  # missing: created
    assert main(["restore", str(src), "--model", "bicubic", "--task", "sr-x2", "-o", str(out)]) == 0
    dst = out / "a_sr-x2.png"
    before = dst.read_bytes()
    assert main(["restore", str(src), "--task", "sr-x2", "-o", str(out)]) == 1
    assert dst.read_bytes() == before and "exists (use --overwrite" in capsys.readouterr().err
    assert main(["restore", str(src), "--task", "sr-x2", "-o", str(out), "--overwrite"]) == 0
    np.testing.assert_array_equal(read_image(dst), engine(tiny(), crop, task="sr-x2"))  # replaced
    # never an input, even with --overwrite
    assert main(["restore", str(src), "--model", "identity", "--task", "denoise-15", "-o", str(src),
                 "--overwrite"]) == 1
    np.testing.assert_array_equal(read_image(src), crop)
    # an output folder that cannot be made: a clear error before any model is loaded or image read
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert main(["restore", str(src), "--task", "sr-x2", "-o", str(tmp_path / "file" / "sub")]) == 1
    cap = capsys.readouterr()
    assert "cannot write to this output folder" in cap.err and "image(s), task" not in cap.out
    assert main(["restore", str(src), "--task", "sr-x2", "-o", str(tmp_path / "file")]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err
    # two inputs that would write one output name
    Image.fromarray(crop).save(tmp_path / "a.jpg")
    assert main(["restore", str(src), str(tmp_path / "a.jpg"), "--task", "sr-x2", "-o", str(tmp_path / "c")]) == 2


def test_a_full_disk_leaves_no_partial_file(zoo, crop, tmp_path, monkeypatch, capsys):
    Image.fromarray(crop).save(tmp_path / "a.png")

    def full_disk(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half an image")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "out"
    assert main(["restore", str(tmp_path / "a.png"), "--task", "sr-x2", "-o", str(out)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # neither the output nor its temporary


def test_write_picture_refuses_to_clobber_a_file_that_appears(crop, tmp_path):
    dst = tmp_path / "x.png"
    dst.write_bytes(b"the user's file")
    with pytest.raises(ImageError, match="exists"):
        write_picture(dst, Picture.from_array(crop), overwrite=False)
    assert dst.read_bytes() == b"the user's file" and len(list(tmp_path.iterdir())) == 1


# ------------------------------------------------------------------------------------------------------------
# Default models, eval, the Python API
# ------------------------------------------------------------------------------------------------------------

def test_default_model_of_a_task(zoo, crop, tmp_path, capsys):
    Image.fromarray(crop).save(tmp_path / "a.png")
    assert main(["restore", str(tmp_path / "a.png"), "--task", "sr-x4", "-o", str(tmp_path / "o1")]) == 0
    assert main(["restore", str(tmp_path / "a.png"), "--task", "sr-x4", "--model", "default",
                 "-o", str(tmp_path / "o2")]) == 0
    assert (tmp_path / "o1" / "a_sr-x4.png").read_bytes() == (tmp_path / "o2" / "a_sr-x4.png").read_bytes()
    capsys.readouterr()
    assert main(["restore", str(tmp_path / "a.png"), "--task", "derain-light", "-o", str(tmp_path / "o3")]) == 2
    assert ("no bundled model does 'derain-light' yet (tasks with a default model: sr-x2, sr-x4, denoise-25)"
            in capsys.readouterr().err)
    assert main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o3")]) == 2  # which task?
    assert "give --task" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()
    # eval without --model scores the default model and names it
    (tmp_path / "set").mkdir()
    Image.fromarray(read_image(SAMPLE)[:96, :96]).save(tmp_path / "set" / "b.png")
    assert main(["eval", "--task", "sr-x2", "--data", str(tmp_path / "set"), "--json", str(tmp_path / "r.json"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["model"] == "tiny"


def test_python_api_in_two_lines(zoo, crop, tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.dstack([crop, crop[..., 0]])).save(path)
    out = edtir.restore(path, task="sr-x2")  # file in: RGBA stays RGBA
    assert out.shape == (80, 96, 4) and out.dtype == np.uint8
    model = tiny()
    np.testing.assert_array_equal(out[..., :3], engine(model, crop, task="sr-x2"))
    np.testing.assert_array_equal(edtir.restore(Image.open(path), task="sr-x2"), out)  # PIL in
    np.testing.assert_array_equal(edtir.restore(crop, task="sr-x2"), out[..., :3])  # numpy in
    assert edtir.restore(crop[..., 0], task="sr-x2").shape == (80, 96)  # grey stays 2-D
    deep = edtir.restore(crop.astype(np.uint16) * 257, task="denoise-25")
    assert deep.dtype == np.uint16 and deep.shape == crop.shape
    f = edtir.restore(crop.astype(np.float32) / 255, task="sr-x2")
    assert f.dtype == np.float32 and 0 <= f.min() and f.max() <= 1
    np.testing.assert_array_equal(np.round(f * 255).astype(np.uint8), out[..., :3])
    np.testing.assert_array_equal(edtir.restore(crop, task="sr-x2", model="bicubic"), edtir.imresize(crop, 2))
    np.testing.assert_array_equal(edtir.restore(crop, task="sr-x2", weights=zoo / "tiny.safetensors"),
                                  out[..., :3])
    # the engine's form, a model first, is unchanged
    np.testing.assert_array_equal(edtir.restore(model, crop, task="sr-x2"), engine(model, crop, task="sr-x2"))
    with pytest.raises(UsageError, match="no bundled model does 'derain-heavy'"):
        edtir.restore(crop, task="derain-heavy")
    with pytest.raises(UsageError, match="give --task|name a task"):
        edtir.restore(crop)
    with pytest.raises(ImageError, match="expected a file path"):
        edtir.restore([1, 2, 3], task="sr-x2")
    span = r"array: float pixels must lie in \[0, 1\]; these span \[44, 168\] \(0-255 data: divide"
    with pytest.raises(ImageError, match=span):
        edtir.restore(crop.astype(np.float32), task="sr-x2")  # 0-255 floats: refused, not a white picture
    with pytest.raises(ImageError, match="array: has NaN"):
        edtir.restore(np.where(crop > 128, np.nan, crop / 255), task="sr-x2")
    nudged = crop.astype(np.float32) / 255 + np.float32(0.005)  # an overshoot of a rounding is clipped, not refused
    assert edtir.restore(nudged, task="sr-x2").max() <= 1


# ------------------------------------------------------------------------------------------------------------
# make demo
# ------------------------------------------------------------------------------------------------------------

def test_demo_sr_x4_and_denoising(zoo, tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: float(line.split()[-2]) for line in out.splitlines() if line.endswith(" dB")}
    assert 25 < lines["bicubic"] < 35  # x4 bicubic of a real photo, PSNR on Y
    assert 19.5 < lines["noisy"] < 21.0  # sigma 25 noise: 20.2 dB, clipped to [0, 255]
    assert "tiny" in lines
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == sorted(["comparison.png", "kodim23_original.png", "kodim23_lr_x4.png",
                            "kodim23_sr-x4_bicubic.png", "kodim23_sr-x4_tiny.png", "kodim23_noisy_25.png",
                            "kodim23_denoise-25_tiny.png"])
    comp = read_image(tmp_path / "comparison.png")
    assert comp.shape[1] == 4 * 240 + 3 * 6 and comp.shape[0] == 2 * (240 + 20 + 8)  # 2 rows of labelled panels
    assert read_image(tmp_path / "kodim23_lr_x4.png").shape == (60, 60, 3)


def test_demo_without_the_models_it_wants(zoo_dir, tmp_path, monkeypatch, capsys):
    only_x2 = tmp_path / "zoo"
    only_x2.mkdir()
    (only_x2 / "tiny.safetensors").write_bytes((zoo_dir / "tiny.safetensors").read_bytes())
    (only_x2 / "registry.json").write_text(json.dumps({"tiny": entry("tiny.safetensors", TASKS, ["sr-x2"])}))
    monkeypatch.setenv("EDTIR_ZOO", str(only_x2))
    assert main(["demo", "--output-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "no bundled model does sr-x4 yet; showing sr-x2 instead" in out
    assert "denoising: skipped (no bundled model does denoise-25 yet)" in out
    assert (tmp_path / "a" / "comparison.png").exists()
    monkeypatch.setenv("EDTIR_ZOO", str(tmp_path / "empty"))
    assert main(["demo", "--output-dir", str(tmp_path / "b")]) == 1
    assert "nothing to show" in capsys.readouterr().out
