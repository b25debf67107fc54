"""The bundled models: registry complete and true to the files, fp16 on disk and fp32 in memory, the default sr-x2
model's Set5 score re-measured against the registry, `edtir models`, and the tool that bundles a model."""

import hashlib
import json
import re
import struct
import subprocess

import numpy as np
import pytest
import torch
from conftest import REPO

import edtir
from edtir import zoo
from edtir.cli import main
from edtir.errors import CheckpointError, UsageError


def safetensors_dtypes(path) -> set[str]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_bundled_registry_is_complete_and_true_to_the_files():
    reg = zoo.registry()
    assert reg, "no bundled model"
    assert "sr-x2" in zoo.defaults()
    for name, e in reg.items():
        f = zoo.HERE / e["file"]
        assert f.exists(), name
        assert e["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest(), f"{name}: file changed, re-measure it"
        assert safetensors_dtypes(f) == {"F16"}, name  # bundled as fp16 ...
        model = zoo.get_model(name)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # ... and loaded as fp32
        assert (e["params"], tuple(e["tasks"])) == (model.info.params, model.tasks), name
        assert e["arch"] == f"EDT-{model.info.size}"
        stages = e["recipe"]["config"].split(", then ")  # a model trained in stages names each stage's config
        assert all((REPO / c).is_file() for c in stages), stages
        assert e["recipe"]["command"].startswith("edtir train")
        assert isinstance(e["steps"], int) and e["steps"] > 0 and e["data"]
        for task in e["tasks"]:  # a score for every test set of every task it does
            sets = e["scores"][task]
            assert list(sets) == list(zoo.test_sets(task)), (name, task)
            assert all(10 < s["psnr"] < 60 and 0 < s["ssim"] <= 1 and s["images"] > 0 for s in sets.values())
        assert len(e["measured"]["commands"]) == len(e["tasks"]) and e["measured"]["machine"]


def test_default_sr_x2_model_scores_what_the_registry_says_on_set5(data_dir, tmp_path):
    """`edtir eval` without --model runs the default sr-x2 model; Set5 must match the registry to 0.01 dB."""
    name = zoo.default_for("sr-x2")
    want = zoo.registry()[name]["scores"]["sr-x2"]["Set5"]
    out = tmp_path / "r.json"
    assert main(["eval", "--task", "sr-x2", "--data", str(data_dir / "Set5"), "--json", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    got = json.loads(out.read_text())["results"][0]
    assert got["model"] == name and got["images"] == 5
    assert abs(got["psnr"] - want["psnr"]) <= 0.01
    assert abs(got["ssim"] - want["ssim"]) <= 0.001
    assert got["psnr"] > 33.68 + 0.05  # above bicubic (33.68 with this protocol and copy of Set5)


def test_models_command(capsys):
    reg = zoo.registry()
    name = zoo.default_for("sr-x2")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert name in out and "bicubic" in out and "identity" in out
    assert all(f"  {n}  " in out for n in reg)  # a long name still leaves a gap before its arch column
    assert f"Set5 {reg[name]['scores']['sr-x2']['Set5']['psnr']:.2f}/" in out
    assert main(["models", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["defaults"]["sr-x2"] == name and doc["models"][name]["file_bytes"] > 0
    assert main(["models", name]) == 0
    out = capsys.readouterr().out
    assert reg[name]["recipe"]["command"] in out and "edtir eval --task sr-x2" in out
    assert main(["models", "nosuch"]) == 2


def test_registry_validation_names_the_problem():
    from edtir.zoo import validate

    good = {"file": "a.safetensors", "arch": "EDT-T", "params": 1, "tasks": ["sr-x2", "sr-x4"],
            "default_for": ["sr-x2"], "description": "", "data": "", "steps": 1, "recipe": {}, "scores": {}}
    validate({"a": good, "b": {**good, "default_for": ["sr-x4"]}})
    with pytest.raises(CheckpointError, match="two defaults for 'sr-x2'"):
        validate({"a": good, "b": good})
    with pytest.raises(CheckpointError, match="lacks scores"):
        validate({"a": {k: v for k, v in good.items() if k != "scores"}})
    with pytest.raises(CheckpointError, match="unknown task 'sr-x8'"):
        validate({"a": {**good, "tasks": ["sr-x8"]}})
    with pytest.raises(CheckpointError, match="default for 'denoise-25' but does not do it"):
        validate({"a": {**good, "default_for": ["denoise-25"]}})


def test_zoo_folder_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDTIR_ZOO", str(tmp_path))
    assert zoo.registry() == {} and zoo.default_model() is None
    (tmp_path / "registry.json").write_text("{not json")
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert "cannot read the model registry" in err and len(err.strip().splitlines()) == 1


def test_bundle_tool_writes_fp16_and_a_valid_entry(tmp_path):
    from edtir.zoo import bundle

    torch.manual_seed(0)
    model = edtir.build_model("T", ["sr-x3", "denoise-15"], depths=(2,))
    edtir.save_model(model, tmp_path / "trained.safetensors")
    zoo_dir = tmp_path / "zoo"
    zoo_dir.mkdir()
    assert bundle.main([str(tmp_path / "trained.safetensors"), "--name", "m", "--default-for", "sr-x3",
                        "--steps", "10", "--config", "configs/zoo-edt-t-multi.yaml", "--command", "edtir train x",
                        "--data", "291", "--description", "test", "--zoo", str(zoo_dir), "--skip-measure"]) == 0
    entry = json.loads((zoo_dir / "registry.json").read_text())["m"]
    assert entry["tasks"] == ["sr-x3", "denoise-15"] and entry["default_for"] == ["sr-x3"]
    assert safetensors_dtypes(zoo_dir / "m.safetensors") == {"F16"}
    back = edtir.load_model(zoo_dir / "m.safetensors")
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        np.testing.assert_array_equal(a.half().float().numpy(), b.numpy(), err_msg=k)


def git(cwd, *args) -> bytes:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(cwd), *args],
                          capture_output=True, check=True).stdout


def test_retired_models_stay_on_record_and_restorable(capsys):
    """Each retired model: no longer shipped, its record kept, and the commit it names holds its exact file."""
    gone, reg = zoo.retired(), zoo.registry()
    assert gone, "no retired model"
    history = (REPO / ".git").exists() and subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "HEAD"],
                                                          capture_output=True).returncode == 0
    for name, e in gone.items():
        assert name not in reg and not (zoo.HERE / e["file"]).exists(), name
        assert e["default_for"] == [] and e["retired"]["path"] == f"src/edtir/zoo/{e['file']}"
        assert all(r in reg or r in gone for r in e["retired"]["replaced_by"].split(", ")), name
        assert all(list(e["scores"][t]) == list(zoo.test_sets(t)) for t in e["tasks"]), name
        if history:
            blob = git(REPO, "show", f"{e['retired']['commit']}:{e['retired']['path']}")
            assert hashlib.sha256(blob).hexdigest() == e["sha256"], name
    name = next(iter(gone))
    with pytest.raises(UsageError, match=f"no longer ships.*git show {gone[name]['retired']['commit'][:12]}"):
        zoo.get_model(name)
    assert main(["models", name]) == 0
    out = capsys.readouterr().out
    assert zoo.restore_command(gone[name]) in out and "retired" in out
    assert main(["models"]) == 0
    assert name in capsys.readouterr().out.split("retired (no longer shipped")[1]
    assert main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["retired"][name] == gone[name]


def test_readme_zoo_sizes_are_what_the_retire_tool_prints(capsys):
    """The README's "N MB of weights, against about M with them all" is `python -m edtir.zoo.retire`'s line."""
    from edtir.zoo.retire import main as retire

    assert retire([]) == 0
    out = capsys.readouterr().out
    m = re.match(r"(\d+) bundled files, ([\d.]+) MB"
                 r"(; with the (\d+) retired ones \(in git history\) ([\d.]+) MB)?", out)
    assert m and int(m[1]) == len(zoo.registry()), out
    readme = (REPO / "README.md").read_text()
    assert f"({float(m[2]):.0f} MB of weights, against" in readme
    if m[3]:  # a checkout with its history
        assert int(m[4]) == len(zoo.retired()), out
        assert f"against about {float(m[5]):.0f} with them all" in readme


def test_a_config_starting_from_a_retired_file_says_how_to_restore_it(tmp_path, capsys):
    name, e = next(iter(zoo.retired().items()))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{size: T, tasks: [{e['tasks'][0]}]}}\n"
                   f"data: {{{e['tasks'][0]}: {{folders: [{tmp_path}], patch: 48}}}}\n"
                   f"init: {{path: {REPO / e['retired']['path']}}}\n")
    assert main(["train", str(cfg), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "init.path" in err and zoo.restore_command(e) in err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_retire_tool_moves_the_entry_and_deletes_only_a_committed_file(tmp_path, monkeypatch, capsys):
    from edtir.zoo import bundle, retire

    repo, zdir = tmp_path / "repo", tmp_path / "repo" / "zoo"
    zdir.mkdir(parents=True)
    torch.manual_seed(0)
    edtir.save_model(edtir.build_model("T", ["sr-x2"], depths=(2,)), tmp_path / "w.safetensors")
    for name, default in (("new", "sr-x2"), ("old", "")):
        assert bundle.main([str(tmp_path / "w.safetensors"), "--name", name, "--default-for", default,
                            "--steps", "1", "--config", "c.yaml", "--command", "edtir train c.yaml", "--data", "d",
                            "--description", name, "--zoo", str(zdir), "--skip-measure"]) == 0
    git(repo, "init", "-q")
    git(repo, "commit", "-q", "--allow-empty", "-m", "start")
    assert retire.main(["old", "--zoo", str(zdir)]) == 2  # its file is not committed: nothing to restore it from
    assert "does not hold" in capsys.readouterr().err and (zdir / "old.safetensors").exists()
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "zoo")
    assert retire.main(["new", "--zoo", str(zdir)]) == 2  # the default of sr-x2
    assert "default for sr-x2" in capsys.readouterr().err
    want = hashlib.sha256((zdir / "old.safetensors").read_bytes()).hexdigest()
    assert retire.main(["old", "--zoo", str(zdir)]) == 0
    assert not (zdir / "old.safetensors").exists() and (zdir / "new.safetensors").exists()
    monkeypatch.setenv("EDTIR_ZOO", str(zdir))
    assert list(zoo.registry()) == ["new"] and list(zoo.retired()) == ["old"]
    entry = zoo.retired()["old"]
    assert entry["retired"]["replaced_by"] == "new" and entry["retired"]["path"] == "zoo/old.safetensors"
    cmd = zoo.restore_command(entry)
    assert cmd in capsys.readouterr().out and cmd in zoo.retired_hint("somewhere/old.safetensors")
    subprocess.run(cmd, shell=True, cwd=repo, check=True)  # the command it prints brings the exact file back
    assert hashlib.sha256((zdir / "old.safetensors").read_bytes()).hexdigest() == want == entry["sha256"]
