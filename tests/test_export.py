"""ONNX export: one file with dynamic height and width gives what PyTorch gives (onnxruntime, max abs diff <= 1e-4)
on real image crops of two sizes. Skipped without the onnx extra (pip install 'edtir[onnx]')."""

import numpy as np
import pytest
import torch

import edtir
from edtir import zoo
from edtir.cli import main
from edtir.commands.demo import SAMPLE
from edtir.data.io import read_image, uint8_to_tensor

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An EDT-T SR x2 with the bundled model's weights for its first two blocks (the whole network would take
    minutes to export on a 2-core CPU), exported once by `edtir export`."""
    d = tmp_path_factory.mktemp("onnx")
    bundled = zoo.get_model(zoo.default_for("sr-x2")).state_dict()
    model = edtir.build_model("T", ["sr-x2"], depths=(2,))
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in bundled.items() if k in own and own[k].shape == v.shape}, strict=True)
    model.eval()
    weights = d / "two-blocks.safetensors"
    edtir.save_model(model, weights)
    out = d / "x2.onnx"
    assert main(["export", str(weights), "--format", "onnx", "-o", str(out), "--no-check"]) == 0
    return model, out


def test_onnx_matches_pytorch_at_two_sizes_from_one_file(exported):
    model, path = exported
    m = model.size_multiple("sr-x2")
    image = read_image(SAMPLE)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [d for d in sess.get_inputs()[0].shape[2:]] != [None, None]  # named dynamic dims
    diffs = []
    for (i, j), (h, w) in (((0, 0), (2 * m, 3 * m)), ((90, 40), (5 * m, 4 * m))):
        x = uint8_to_tensor(image[i:i + h, j:j + w])
        with torch.no_grad():
            ref = model(x, "sr-x2").numpy()
        out = sess.run(None, {"input": x.numpy()})[0]
        assert out.shape == (1, 3, 2 * h, 2 * w)
        diffs.append(float(np.abs(out - ref).max()))
        assert np.ptp(ref) > 0.3  # a real image's range, against which 1e-4 is small
    assert max(diffs) <= 1e-4, diffs
    meta = {p.key: p.value for p in __import__("onnx").load(str(path)).metadata_props}
    assert meta["edtir.task"] == "sr-x2" and meta["edtir.size_multiple"] == str(m) and meta["edtir.scale"] == "2"


def test_export_usage_errors(tmp_path, exported, capsys):
    _, path = exported
    assert main(["export", "edt-nosuch", "-o", str(tmp_path / "a.onnx")]) == 2
    assert main(["export", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "a.onnx")]) == 1
    assert main(["export", "bicubic", "-o", str(tmp_path / "a.onnx")]) == 2
    assert main(["export", str(path), "-o", str(tmp_path / "a.txt")]) == 2
    assert main(["export", str(path), "-o", str(path)]) == 2  # exists, no --overwrite
    err = capsys.readouterr().err
    assert "neither a file nor a bundled model" in err and "missing.safetensors" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())
