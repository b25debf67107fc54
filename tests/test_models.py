"""The EDT family against the official release: keys, shapes, order, parameter counts, outputs, loading."""

import csv
import pickle

import numpy as np
import pytest
import torch

import edtir
from edtir.cli import main
from edtir.errors import CheckpointError
from edtir.models import edt
from edtir.models.checkpoint import load_partial, official_state_dict, read_state_dict
from edtir.models.edt import EDT, EDTConfig, shift_mask

REFERENCE = __import__('pathlib').Path(__file__).resolve().parents[2] / 'shared' / 'reference'


def official_rows():
    path = REFERENCE / "official-configs.tsv"
    if not path.exists():
        return []
    rows, seen = [], set()
    for r in csv.DictReader(open(path), delimiter="\t"):
        if r["keys_file"] not in seen:
            seen.add(r["keys_file"])
            rows.append(r)
    return rows


def config_for(row) -> EDTConfig:
    over = {"sf": row["no_downsampling(SF)"] == "yes"}
    if row["sr_upsampler"] != "-":
        over["upsampler"] = row["sr_upsampler"]
    return EDTConfig.preset(row["size"], tasks=row["tasks"].split(","), **over)


def reference_keys(row):
    lines = (REFERENCE / "keys" / row["keys_file"]).read_text().strip().splitlines()
    return [(k, tuple(int(v) for v in s.strip("()").split(",") if v.strip())) for k, s in
            (line.split("\t") for line in lines)]


ROWS = official_rows()


@pytest.mark.parametrize("row", ROWS, ids=[r["keys_file"] for r in ROWS])
def test_official_layout_every_config(row):
    cfg = config_for(row)
    model = EDT(cfg)
    ref = reference_keys(row)
    assert len(ref) == int(row["state_keys"])
    # names, shapes and order, mask buffers included, equal the official state dict
    mine = [(k, tuple(v.shape)) for k, v in official_state_dict(model).items()]
    assert mine == ref
    assert sum(p.numel() for p in model.parameters()) == int(row["params"])
    # a state dict in the official layout loads strictly, and detection recovers the configuration
    sd = {k: torch.zeros(s) for k, s in ref}
    sd.update({k: v for k, v in official_state_dict(model).items() if "attn_mask" in k})
    loaded = edtir.load_model(sd)
    assert loaded.cfg.tasks == cfg.tasks
    assert loaded.cfg.upsampler == cfg.upsampler or not any(t.startswith("sr") for t in cfg.tasks)
    assert loaded.cfg.downsample == cfg.downsample
    assert loaded.info.size == row["size"].replace("EDT", "")
    assert loaded.info.params == int(row["params"])
    assert loaded.load_report.masks_checked == sum(1 for k, _ in ref if "attn_mask" in k)


def test_sizes_table_sr_x2_params():
    expected = {"T": 916_924, "S": 4_230_323, "B": 11_479_355, "L": 39_927_395}
    for size, n in expected.items():
        assert edtir.build_model(size, ["sr-x2"]).info.params == n


def test_official_output_reproduced(official_pair, tmp_path):
    sd, io = official_pair
    path = tmp_path / "SRx2_EDTT.pth"
    torch.save(sd, path)
    model = edtir.load_model(path)
    assert model.info.size == "T" and model.cfg.upsampler == "pixelshuffledirect"
    with torch.no_grad():
        out = model(torch.from_numpy(io["input"]))
    assert out.shape == io["output"].shape
    np.testing.assert_allclose(out.numpy(), io["output"], atol=2e-5, rtol=0)


def test_nested_and_prefixed_official_files(official_pair, tmp_path):
    sd, io = official_pair
    for i, wrap in enumerate((lambda s: {"params_ema": s}, lambda s: {"state_dict": {"module." + k: v
                                                                                     for k, v in s.items()}})):
        path = tmp_path / f"wrapped{i}.pth"
        torch.save(wrap(sd), path)
        with torch.no_grad():
            out = edtir.load_model(path)(torch.from_numpy(io["input"]))
        np.testing.assert_allclose(out.numpy(), io["output"], atol=2e-5, rtol=0)


def test_safetensors_and_official_roundtrip(official_pair, tmp_path):
    sd, io = official_pair
    model = edtir.load_model(sd)
    edtir.save_model(model, tmp_path / "m.safetensors")
    edtir.save_official(model, tmp_path / "m.pth")
    st = read_state_dict(tmp_path / "m.safetensors")
    assert not any("attn_mask" in k for k in st)  # masks are recomputed, not stored
    back = torch.load(tmp_path / "m.pth", weights_only=True)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    x = torch.from_numpy(io["input"])
    with torch.no_grad():
        a = edtir.load_model(tmp_path / "m.safetensors")(x)
    np.testing.assert_allclose(a.numpy(), io["output"], atol=2e-5, rtol=0)


def test_shift_mask_regions_by_hand():
    m = shift_mask(48, 48, (6, 24), (3, 12))
    assert m.shape == (16, 144, 144)
    # windows not on the last window row or column see one region only
    assert m[0].abs().sum() == 0  # top-left window: one region
    assert m[1].abs().sum() > 0  # first window row, last window column: split by columns
    # the bottom-right window holds 4 regions of 3x12 tokens: token 0 (row 0, col 0) and token 12 (row 0,
    # col 12) come from different regions, token 0 and token 24*3 (row 3, col 0) too, token 0 and 1 not
    last = m[-1]
    assert last[0, 1] == 0 and last[0, 12] == -100 and last[0, 72] == -100 and last[0, 84] == -100
    assert set(torch.unique(m).tolist()) == {0.0, -100.0}
    # a window in the last window row but the first column: two regions split by rows 0-2 / 3-5
    bottom_left = m[14]
    assert bottom_left[0, 23] == 0 and bottom_left[0, 72] == -100


def test_masks_cached_once_per_size(monkeypatch):
    model = edtir.build_model("T", ["sr-x2"]).eval()
    calls, layouts = [], []
    real, real_layout = edt.shift_mask, edt.WindowLayout
    monkeypatch.setattr(edt, "shift_mask", lambda *a, **k: calls.append(a[:2]) or real(*a, **k))
    monkeypatch.setattr(edt, "WindowLayout", lambda *a, **k: layouts.append(a[:2]) or real_layout(*a, **k))
    x = torch.rand(1, 3, 48, 72)
    with torch.no_grad():
        model(x)
        model(x)
        model(torch.rand(2, 3, 24, 24))
        with edt.reference_mode():
            model(x)
            model(x)
            model(torch.rand(2, 3, 24, 24))
    assert layouts == [(48, 72), (24, 24)]  # fast path: one layout (gather indices and shift bias) per size
    assert calls == [(48, 72), (48, 72), (24, 24), (24, 24)]  # reference: one horizontal + one vertical mask


@pytest.mark.parametrize("window", [(8, 8), (12, 12), (4, 16), (8, 16), (6, 24)])
def test_window_shapes_are_configuration(window, tmp_path):
    model = edtir.build_model("T", ["sr-x2"], window_size=window, depths=(2,)).eval()
    m = model.size_multiple()
    assert m == np.lcm(*window)
    with torch.no_grad():
        assert model(torch.rand(1, 3, m, 2 * m)).shape == (1, 3, 2 * m, 4 * m)
    with pytest.raises(ValueError, match="multiple of"):
        model(torch.rand(1, 3, m + 1, m))
    edtir.save_official(model, tmp_path / "w.pth")
    assert edtir.load_model(tmp_path / "w.pth").cfg.window_size == window  # told apart by the stored masks


def test_task_paths_shapes_and_size_multiples():
    model = edtir.build_model("T", ["sr-x3", "denoise-25", "derain-heavy"]).eval()
    assert model.tasks == ("sr-x3", "denoise-25", "derain-heavy")
    assert [model.size_multiple(t) for t in model.tasks] == [24, 96, 96]
    with torch.no_grad():
        assert model(torch.rand(1, 3, 24, 48), task="sr-x3").shape == (1, 3, 72, 144)
        assert model(torch.rand(1, 3, 96, 192), task="denoise-25").shape == (1, 3, 96, 192)
    with pytest.raises(ValueError, match="pass task"):
        model(torch.rand(1, 3, 24, 24))
    with pytest.raises(ValueError, match="pad to 96x96"):
        model(torch.rand(1, 3, 48, 48), task="derain-heavy")
    sf = edtir.build_model("T", ["denoise-15"], sf=True).eval()
    assert sf.size_multiple() == 24 and sf.info.downsample is False


def test_forward_multi_equals_single_task_forwards():
    torch.manual_seed(0)
    model = edtir.build_model("T", ["sr-x2", "sr-x4", "denoise-15"]).eval()
    inputs = {"sr-x2": torch.rand(2, 3, 24, 24), "sr-x4": torch.rand(1, 3, 24, 24),
              "denoise-15": torch.rand(1, 3, 96, 96)}
    with torch.no_grad():
        multi = model.forward_multi(inputs)
        for t, x in inputs.items():
            torch.testing.assert_close(multi[t], model(x, task=t), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="token grid"):
        model.forward_multi({"sr-x2": torch.rand(1, 3, 48, 48), "denoise-15": torch.rand(1, 3, 96, 96)})


def test_multitask_partial_loading(tmp_path, caplog):
    torch.manual_seed(0)
    full = edtir.build_model("T", ["sr-x2", "sr-x3", "denoise-15"]).eval()
    edtir.save_official(full, tmp_path / "mt.pth")
    with caplog.at_level("INFO"):
        part = edtir.load_model(tmp_path / "mt.pth", tasks=["sr-x3"])
    assert part.tasks == ("sr-x3",)
    assert "dropped" in caplog.text and "head_sr_x2" in caplog.text
    assert {k.split(".")[0] for k in part.load_report.dropped} == {"head_sr_x2", "tail_sr_x2", "head_dn_g15",
                                                                  "tail_dn_g15"}
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(part(x), full(x, task="sr-x3"))
    with pytest.raises(CheckpointError, match="has no sr-x4"):
        edtir.load_model(tmp_path / "mt.pth", tasks=["sr-x4"])


def test_load_partial_reports_upsampler_mismatch():
    """The official EDT-T multi-task pre-training uses pixelshuffle, the fine-tuning model the direct one."""
    pre = edtir.build_model("T", ["sr-x2", "sr-x3", "sr-x4"], upsampler="pixelshuffle")
    ft = edtir.build_model("T", ["sr-x2"])
    before = ft.tail_sr_x2[2][0].weight.clone()
    report = load_partial(ft, official_state_dict(pre), tasks=["sr-x2"])
    assert "tail_sr_x2.2.0.weight" in report.mismatched
    assert torch.equal(ft.tail_sr_x2[2][0].weight, before)
    assert torch.equal(ft.body.conv_after_body.weight, pre.body.conv_after_body.weight)
    assert torch.equal(ft.head_sr_x2[0].weight, pre.head_sr_x2[0].weight)
    assert any(k.startswith("head_sr_x3") for k in report.dropped)
    with pytest.raises(CheckpointError, match="body"):
        load_partial(edtir.build_model("S", ["sr-x2"]), official_state_dict(pre))


def test_bad_files_give_clear_errors(tmp_path, official_pair):
    sd, _ = official_pair
    good = tmp_path / "good.pth"
    torch.save(sd, good)
    cases = {}
    cases["missing"] = (tmp_path / "nope.pth", "no such file")
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated"] = (trunc, "truncated")
    text = tmp_path / "notes.pth"
    text.write_text("hello, not a checkpoint\n" * 10)
    cases["text"] = (text, "not a checkpoint")
    trunc_st = tmp_path / "t.safetensors"
    edtir.save_model(edtir.build_model("T", ["sr-x2"]), trunc_st)
    trunc_st.write_bytes(trunc_st.read_bytes()[:5000])
    cases["truncated safetensors"] = (trunc_st, "truncated")
    extra = dict(sd, **{"body.extra.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    cases["unknown key"] = (tmp_path / "extra.pth", "unknown key")
    wrong = dict(sd, **{"body.conv_after_body.bias": torch.zeros(7)})
    torch.save(wrong, tmp_path / "wrong.pth")
    cases["wrong shape"] = (tmp_path / "wrong.pth", "wrong shape")
    bad_mask = dict(sd)
    k = next(k for k in sd if k.endswith("attn_mask_h"))
    bad_mask[k] = torch.zeros_like(sd[k])
    torch.save(bad_mask, tmp_path / "mask.pth")
    cases["mask"] = (tmp_path / "mask.pth", "shift mask differs")
    torch.save({"foo": 1, "bar": "x"}, tmp_path / "nodict.pth")
    cases["no tensors"] = (tmp_path / "nodict.pth", "not a state dict")
    png = tmp_path / "photo.pth"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    cases["an image"] = (png, "neither a PyTorch nor a safetensors file")
    for path, message in cases.values():
        with pytest.raises(CheckpointError, match=message):
            edtir.load_model(path)


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_code_in_pickle_is_never_run(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"head_sr_x2.0.weight": Evil()}, f)
    with pytest.raises(CheckpointError):
        edtir.load_model(path)
    assert "code ran" not in capsys.readouterr().out


def test_cli_info(tmp_path, capsys):
    assert main(["info", "--arch", "edt-b", "--tasks", "sr-x2,sr-x3"]) == 0
    out = capsys.readouterr().out
    assert "14,576,937" not in out and "parameters" in out
    assert "sr-x2 13.26 M" in out  # the reference's 13.26 M MACs per pixel for EDT-B x2
    edtir.save_official(edtir.build_model("T", ["sr-x4"]), tmp_path / "t.pth")
    assert main(["info", str(tmp_path / "t.pth"), "--no-macs"]) == 0
    out = capsys.readouterr().out
    assert "EDT-T" in out and "sr-x4 x4" in out and "922,144" in out
    assert main(["info", str(tmp_path / "missing.pth")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err
    assert main(["info", "--arch", "edt-x"]) == 2
    assert main(["info", "--arch", "edt-t", "--tasks", "sr-x5"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["info", "--bogus"])
    assert e.value.code == 2


def test_bf16_autocast_runs_on_cpu():
    model = edtir.build_model("T", ["sr-x2"]).eval()
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype in (torch.float32, torch.bfloat16)
    assert (out.float() - ref).abs().max() < 0.1
