"""Training configs: every key checked, errors name the full key path, overrides beat the file."""

from pathlib import Path

import pytest

from edtir.cli import main
from edtir.errors import ConfigError
from edtir.train.config import config_from_dict, load_config, rain_of

REPO = Path(__file__).resolve().parents[1]


def base(**sections):
    raw = {"model": {"size": "T", "tasks": ["sr-x2"]}, "data": {"sr-x2": {"folders": ["x"], "patch": 24}}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


@pytest.mark.parametrize("raw, key", [
    (base(train={"lerning_rate": 1e-4}), "train.lerning_rate"),
    (base(data={"sr-x2": {"folders": ["x"], "pach": 24}}), "data.sr-x2.pach"),
    (base(checkpoint={"evry": 5}), "checkpoint.evry"),
    ({**base(), "trian": {}}, "trian"),
])
def test_unknown_key_names_full_path(raw, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        config_from_dict(raw)


@pytest.mark.parametrize("raw, key", [
    (base(train={"lr": "fast"}), "train.lr"),
    (base(train={"batch": 2.5}), "train.batch"),
    (base(train={"betas": 0.9}), "train.betas"),
    (base(log={"tensorboard": "yes"}), "log.tensorboard"),
    (base(data={"sr-x2": {"folders": "x"}}), "data.sr-x2.folders"),
    (base(train={"weights": {"sr-x2": "heavy"}}), "train.weights.sr-x2"),
    (base(model={"tasks": ["sr-x5"]}), r"model.tasks\[0\]"),
    (base(train={"loss": "l3"}), "train.loss: unknown loss 'l3'"),
    (base(train={"losses": {"sr-x2": "huber"}}), "train.losses.sr-x2: unknown loss"),
    (base(train={"losses": {"sr-x3": "l2"}}), "train.losses.sr-x3: not a task"),
])
def test_wrong_type_or_value_names_key(raw, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        config_from_dict(raw)


def test_semantic_checks():
    with pytest.raises(ConfigError, match="data.denoise-15: missing"):
        config_from_dict(base(model={"tasks": ["sr-x2", "denoise-15"]}))
    raw = base(model={"tasks": ["sr-x2", "denoise-15"]})
    raw["data"]["denoise-15"] = {"folders": ["x"], "patch": 192}
    with pytest.raises(ConfigError, match="token grids must match"):  # SR 24 vs 192/4 = 48
        config_from_dict(raw)
    raw["data"]["denoise-15"]["patch"] = 96
    assert config_from_dict(raw).patch("denoise-15") == 96
    with pytest.raises(ConfigError, match="data.sr-x2.patch: 30 must be a positive multiple of 24"):
        config_from_dict(base(data={"sr-x2": {"folders": ["x"], "patch": 30}}))
    with pytest.raises(ConfigError, match="train.precision"):
        config_from_dict(base(train={"precision": "fp16"}))
    with pytest.raises(ConfigError, match="init.tasks"):
        config_from_dict(base(init={"path": "m.safetensors", "tasks": ["sr-x3"]}))
    with pytest.raises(ConfigError, match="init.body: given without init.path"):
        config_from_dict(base(init={"body": "m.safetensors"}))
    with pytest.raises(ConfigError, match="init.heads_from: given without init.path"):
        config_from_dict(base(init={"heads_from": {"sr-x2": "sr-x4"}}))
    for heads_from, msg in (({"sr-x3": "sr-x2"}, "init.heads_from.sr-x3: 'sr-x3' is not in model.tasks"),
                            ({"sr-x2": "sr-x5"}, "init.heads_from.sr-x2: unknown task 'sr-x5'"),
                            ({"sr-x2": "denoise-25"}, "init.heads_from.sr-x2: denoise-25's head and tail do not "
                                                      "fit sr-x2"),
                            ({"sr-x2": 4}, "init.heads_from.sr-x2: expected a string")):
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(base(init={"path": "m.safetensors", "heads_from": heads_from}))
    with pytest.raises(ConfigError, match="init.heads_from.sr-x2: 'sr-x2' is not in init.tasks"):
        config_from_dict(base(init={"path": "m.safetensors", "tasks": [], "heads_from": {"sr-x2": "sr-x4"}}))
    assert config_from_dict(base(init={"path": "m.safetensors", "heads_from": {"sr-x2": "sr-x4"}})
                            ).init.heads_from == {"sr-x2": "sr-x4"}
    rain = {"model": {"size": "T", "tasks": ["derain-light"]},
            "data": {"derain-light": {"folders": ["x"], "patch": 96, "rain": "light-wide"}}}
    assert rain_of(config_from_dict(rain), "derain-light") == "light-wide"
    rain["data"]["derain-light"]["rain"] = "drizzle"
    with pytest.raises(ConfigError, match="^data.derain-light.rain: expected one of light, heavy, light-wide, "
                                          "heavy-wide, got 'drizzle'"):
        config_from_dict(rain)


def test_overrides_beat_file_and_are_checked(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {size: T, tasks: [sr-x2]}\ndata: {sr-x2: {folders: [x], patch: 24}}\n"
                 "train: {lr: 2e-4, milestones: [10]}\n")
    cfg = load_config(f)
    assert cfg.train.lr == 2e-4  # YAML 1.1 reads 2e-4 as a string: still a number here
    cfg = load_config(f, ["train.lr=1e-5", "train.milestones=[]", "data.sr-x2.subset=10", "val.every=7"])
    assert (cfg.train.lr, cfg.train.milestones, cfg.data["sr-x2"].subset, cfg.val.every) == (1e-5, [], 10, 7)
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        load_config(f, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(f, ["train.lr"])
    with pytest.raises(ConfigError, match="train.lr.x"):
        load_config(f, ["train.lr.x=1"])


def test_shipped_configs_are_valid():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(files) >= 30
    for f in files:
        load_config(f)
    cfg = load_config(REPO / "configs" / "cpu-sr-x2.yaml")
    assert cfg.model.size == "T" and cfg.model.tasks == ["sr-x2"] and cfg.checkpoint.every == 5
    paper = load_config(REPO / "configs" / "paper" / "edt-b-pretrain-sr-x2.yaml")
    assert (paper.train.lr, paper.train.betas, paper.train.batch) == (2e-4, [0.9, 0.99], 4)
    assert paper.train.milestones == [250_000, 400_000, 450_000, 475_000] and paper.patch("sr-x2") == 48
    dn = load_config(REPO / "configs" / "paper" / "edt-b-pretrain-denoise-25.yaml")
    assert dn.train.milestones == [400_000, 640_000, 720_000, 760_000] and dn.train.iterations == 800_000
    assert dn.patch("denoise-25") == 192


def test_cli_reports_bad_key_in_one_line(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("model: {size: T, tasks: [sr-x2]}\ndata: {sr-x2: {folders: [x], patch: 24}}\n")
    assert main(["train", str(f), "--output-dir", str(tmp_path / "o"), "train.lerning_rate=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.lerning_rate" in err and len(err.splitlines()) == 1


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_a_base_config_is_written_as_its_differences():
    child = flat(load_config(REPO / "configs" / "zoo-edt-t-derain-light-v12.yaml").to_dict())
    parent = flat(load_config(REPO / "configs" / "zoo-edt-t-derain-light-v11.yaml").to_dict())
    changed = {k for k in child if child[k] != parent[k]}
    assert changed == {"name", "train.iterations", "train.milestones", "train.seed", "init.path"}
    assert child["data.derain-light.exclude"] == ["../shared/data/rain100-overlap-BSD200.txt"]  # inherited
    assert child["init.path"].endswith("edt-t-derain-light-v11-291.safetensors")


def test_base_merges_sections_replaces_lists_and_never_lends_its_name(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "parent.yaml").write_text(
        "name: parent\noutput_dir: runs/parent\nmodel: {size: T, tasks: [sr-x2]}\n"
        "data: {sr-x2: {folders: [x, y], patch: 24}}\n"
        "train: {lr: 2e-4, milestones: [10, 20], seed: 3}\n")
    (tmp_path / "sub" / "child.yaml").write_text(
        "base: ../parent.yaml\ndata: {sr-x2: {folders: [z]}}\ntrain: {milestones: [5]}\n")
    cfg = load_config(tmp_path / "sub" / "child.yaml", ["train.seed=9"])
    assert cfg.name == "child" and cfg.output_dir is None  # the two never share a run folder
    assert cfg.data["sr-x2"].folders == ["z"] and cfg.data["sr-x2"].patch == 24
    assert (cfg.train.lr, cfg.train.milestones, cfg.train.seed) == (2e-4, [5], 9)
    assert load_config(tmp_path / "parent.yaml").train.milestones == [10, 20]


def test_bad_base_is_a_one_line_error(tmp_path, capsys):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="base: a.yaml leads back to a.yaml, a cycle"):
        load_config(a)
    a.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: base: missing.yaml: no such config file"):
        load_config(a)
    a.write_text("base: [b.yaml]\n")
    with pytest.raises(ConfigError, match="base: expected the path of another config file"):
        load_config(a)
    with pytest.raises(ConfigError, match="only a config file can name a base"):
        config_from_dict({**base(), "base": "b.yaml"})
    a.write_text("base: b.yaml\n")
    assert main(["train", str(a), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cycle" in err and len(err.splitlines()) == 1


def test_print_config_shows_what_would_run_and_trains_nothing(tmp_path, capsys):
    import yaml

    cfg = REPO / "configs" / "zoo-edt-t-derain-light-v12.yaml"
    out = tmp_path / "o"
    assert main(["train", str(cfg), "--output-dir", str(out), "--print-config", "--iterations", "7",
                 "train.seed=5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["name"] == "zoo-edt-t-derain-light-v12" and shown["train"]["seed"] == 5
    assert shown["train"]["iterations"] == 7 and shown["train"]["loss"] == "l2"  # the base's loss
    assert shown["data"]["derain-light"]["rain"] == "light-wide" and not out.exists()
    assert main(["train", str(cfg), "--print-config", "--iterations", "-1"]) == 2  # as without --print-config
    assert "--iterations must be >= 0" in capsys.readouterr().err
