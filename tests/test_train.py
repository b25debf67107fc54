"""Training: the loss falls, multi-task steps reach every task, fine-tuning loads partially, resume is exact
(in process and after SIGKILL), and two gloo processes match one process with the same global batch."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from edtir.errors import CheckpointError
from edtir.models.checkpoint import load_model, save_model
from edtir.models.edt import build_model
from edtir.train.config import LOSSES, config_from_dict
from edtir.train.loop import PIXEL_LOSSES, MultiTaskStep, make_model, train, train_step

REPO = Path(__file__).resolve().parents[1]
T91 = Path(__file__).parents[1].parent / "shared" / "data" / "T91"
needs_t91 = pytest.mark.skipif(not T91.is_dir(), reason=f"{T91} not found (tests read ../shared beside the repo)")


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def raw_config(tasks=("sr-x2",), **sections) -> dict:
    raw = {"name": "test", "model": {"size": "T", "tasks": list(tasks), "drop_path": 0.1},
           "data": {t: {"folders": [str(T91)], "patch": 24 if t.startswith("sr") else 96} for t in tasks},
           "train": {"batch": 2, "iterations": 4, "lr": 1e-3, "milestones": [3], "workers": 0, "device": "cpu",
                     "threads": 1, "seed": 3},
           "checkpoint": {"every": 2, "keep": 0}, "log": {"every": 1, "tensorboard": False}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def assert_same_weights(a: Path, b: Path):
    x, y = tensors(a), tensors(b)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


# ---------------------------------------------------------------------------------------------------------------

def test_loss_per_task_l1_or_l2():
    """``train.losses`` picks each task's pixel loss; the total is their weighted sum."""
    torch.manual_seed(0)
    model = build_model("T", ["sr-x2", "denoise-15"], drop_path=0.0)
    x2, y2 = torch.rand(1, 3, 24, 24), torch.rand(1, 3, 48, 48)
    xd, yd = torch.rand(1, 3, 96, 96), torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        e2, ed = model(x2, task="sr-x2") - y2, model(xd, task="denoise-15") - yd
        l1, l2 = e2.abs().mean().item(), ed.square().mean().item()
        assert ed.abs().mean().item() > 1.5 * l2 and e2.square().mean().item() < l1 / 1.5  # the two differ here
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    loss, losses = train_step(MultiTaskStep(model), {"sr-x2": (x2, y2), "denoise-15": (xd, yd)}, opt,
                              {"sr-x2": 1.0, "denoise-15": 2.0}, torch.device("cpu"), False, None, params,
                              {"sr-x2": "l1", "denoise-15": "l2"})
    assert losses["sr-x2"].item() == pytest.approx(l1, rel=1e-5)
    assert losses["denoise-15"].item() == pytest.approx(l2, rel=1e-5)
    assert loss.item() == pytest.approx(l1 + 2 * l2, rel=1e-5)
    assert tuple(PIXEL_LOSSES) == LOSSES  # every name the config accepts has a loss, and no other


@needs_t91
def test_loss_falls(tmp_path):
    """Held-out patches (never drawn in training) score better after 15 steps than at initialisation."""
    from edtir.data.datasets import TrainPatches, build_sources

    set5 = T91.parent / "Set5"
    cfg = config_from_dict(raw_config(train={"iterations": 15, "lr": 2e-3, "milestones": []},
                                      checkpoint={"every": 100},
                                      val={"folder": str(set5), "every": 15, "max_images": 1}))
    torch.manual_seed(cfg.train.seed)
    initial = make_model(cfg).eval()
    final = load_model(train(cfg, tmp_path / "run", progress=False))
    held_out = TrainPatches(build_sources(cfg), seed=99)
    batch = [held_out[10_000 + i]["sr-x2"] for i in range(8)]
    x, y = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
    with torch.no_grad():
        before = torch.nn.functional.l1_loss(initial(x), y).item()
        after = torch.nn.functional.l1_loss(final(x), y).item()
    assert after < 0.8 * before, (before, after)
    logged = [yaml.safe_load(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 16)) and all(r["loss"] > 0 for r in steps)
    (val,) = [r for r in logged if "val/psnr" in r]  # validation through the eval pipeline, best weights kept
    assert val["step"] == 15 and 20 < val["val/psnr"] < 50 and 0 < val["val/ssim"] <= 1
    assert load_model(tmp_path / "run" / "best.safetensors").tasks == ("sr-x2",)


def test_multitask_step_reaches_every_task_with_its_weight():
    torch.manual_seed(0)
    model = build_model("T", ["sr-x2", "sr-x3", "denoise-15"], drop_path=0.0)
    batch = {"sr-x2": (torch.rand(1, 3, 24, 24), torch.rand(1, 3, 48, 48)),
             "sr-x3": (torch.rand(1, 3, 24, 24), torch.rand(1, 3, 72, 72)),
             "denoise-15": (torch.rand(1, 3, 96, 96), torch.rand(1, 3, 96, 96))}
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-4)
    calls = []
    model.body.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    weights = {"sr-x2": 1.0, "sr-x3": 0.5, "denoise-15": 0.0}
    loss, losses = train_step(MultiTaskStep(model), batch, opt, weights, torch.device("cpu"), False, 1.0, params)
    assert calls == [3]  # one pass through the body with all three tasks' batches
    assert set(losses) == set(batch)
    assert loss.item() == pytest.approx(losses["sr-x2"].item() + 0.5 * losses["sr-x3"].item(), rel=1e-6)

    def grad(prefix):
        return sum(p.grad.abs().sum().item() for n, p in model.named_parameters()
                   if n.startswith(prefix) and p.grad is not None)

    assert grad("head_sr_x2") > 0 and grad("tail_sr_x3") > 0 and grad("body.") > 0
    assert grad("head_dn_g15") == 0 and grad("tail_dn_g15") == 0  # weight 0: no gradient


@needs_t91
def test_finetune_loads_body_and_named_heads(tmp_path, capfd):
    torch.manual_seed(1)
    source = build_model("T", ["sr-x2", "sr-x3"])
    save_model(source, tmp_path / "pre.safetensors")
    raw = raw_config(train={"iterations": 0, "lr": 1e-5, "milestones": []})
    raw["init"] = {"path": str(tmp_path / "pre.safetensors"), "tasks": ["sr-x2"]}
    final = train(config_from_dict(raw), tmp_path / "ft", progress=False)
    err = capfd.readouterr().err
    assert "dropped" in err and "tail_sr_x3" in err and "head_sr_x3" in err
    got, want = tensors(final), {k: v for k, v in source.state_dict().items()}
    assert not any("sr_x3" in k for k in got)
    for k, v in got.items():
        assert torch.equal(v, want[k]), k


@needs_t91
def test_finetune_takes_the_body_from_init_body(tmp_path, capfd):
    """init.body: the heads and tails from init.path, then the body alone from another checkpoint."""
    torch.manual_seed(2)
    heads, body = build_model("T", ["sr-x3"]), build_model("T", ["sr-x2"])
    save_model(heads, tmp_path / "heads.safetensors")
    save_model(body, tmp_path / "body.safetensors")
    raw = raw_config(("sr-x3",), train={"iterations": 0, "lr": 1e-5, "milestones": []})
    raw["init"] = {"path": str(tmp_path / "heads.safetensors"), "tasks": ["sr-x3"],
                   "body": str(tmp_path / "body.safetensors")}
    got = tensors(train(config_from_dict(raw), tmp_path / "ft", progress=False))
    assert "then the body from" in capfd.readouterr().err
    b, h = body.state_dict(), heads.state_dict()
    assert not torch.equal(b["body.conv_after_body.weight"], h["body.conv_after_body.weight"])
    for k, v in got.items():
        assert torch.equal(v, (h if k.startswith(("head_", "tail_")) else b)[k]), k


@needs_t91
def test_finetune_starts_a_task_from_another_tasks_head(tmp_path, capfd):
    """init.heads_from: denoise-15 and denoise-50 both start from the file's denoise-25 head and tail."""
    torch.manual_seed(4)
    source = build_model("T", ["denoise-25", "sr-x2"])
    save_model(source, tmp_path / "dn25.safetensors")
    raw = raw_config(("denoise-15", "denoise-50"), train={"iterations": 0, "lr": 1e-5, "milestones": []})
    raw["init"] = {"path": str(tmp_path / "dn25.safetensors"),
                   "heads_from": {"denoise-15": "denoise-25", "denoise-50": "denoise-25"}}
    got = tensors(train(config_from_dict(raw), tmp_path / "ft", progress=False))
    err = capfd.readouterr().err
    assert "denoise-15 from the file's denoise-25" in err and "0 missing" in err
    assert "dropped 34 (head_sr_x2, tail_sr_x2);" in err  # the denoise-25 head it copied is not "dropped"
    want = source.state_dict()
    assert {k.split(".")[0] for k in got if not k.startswith("body.")} == {
        "head_dn_g15", "tail_dn_g15", "head_dn_g50", "tail_dn_g50"}
    for k, v in got.items():
        src = k.replace("_dn_g15.", "_dn_g25.").replace("_dn_g50.", "_dn_g25.")
        assert torch.equal(v, want[src]), k
    raw["init"]["heads_from"] = {"denoise-15": "derain-light"}  # a task the file does not have
    with pytest.raises(CheckpointError, match="has no derain-light head to start from .it has: denoise-25, sr-x2"):
        train(config_from_dict(raw), tmp_path / "ft2", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Exact resume (with EMA and gradient clipping on, so their state is restored too)

RESUME = {"train": {"ema": 0.9, "grad_clip": 0.5}}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    if not T91.is_dir():
        pytest.skip(f"{T91} not found")
    out = tmp_path_factory.mktemp("ref") / "run"
    n = torch.get_num_threads()
    train(config_from_dict(raw_config(**RESUME)), out, progress=False)
    torch.set_num_threads(n)
    return out


@needs_t91
def test_resume_in_process_is_exact(reference_run, tmp_path):
    out = tmp_path / "run"
    train(config_from_dict(raw_config(**RESUME)), out, iterations=2, progress=False)  # "killed" after step 2
    (out / "model.safetensors").unlink()
    # Leftovers of a write killed half-way: an incomplete newer checkpoint and a temporary folder.
    (out / "checkpoints" / "step_00000003").mkdir()
    shutil.copy(out / "checkpoints" / "step_00000002" / "model.safetensors", out / "checkpoints" / "step_00000003")
    (out / "checkpoints" / ".tmp-step_00000004-1").mkdir()
    with pytest.raises(Exception, match="--resume"):
        train(config_from_dict(raw_config(**RESUME)), out, progress=False)  # refuses without --resume
    train(config_from_dict(raw_config(**RESUME)), out, resume=True, progress=False)
    assert (out / "model.safetensors").read_bytes() == (reference_run / "model.safetensors").read_bytes()
    assert not (out / "checkpoints" / ".tmp-step_00000004-1").exists()
    a = torch.load(out / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    b = torch.load(reference_run / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    assert a["scheduler"] == b["scheduler"] and a["step"] == b["step"] == 4 and a["ema"] is not None
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]) and torch.equal(a["model"][k], b["model"][k]), k
    assert any(not torch.equal(a["ema"][k], a["model"][k]) for k in a["ema"])  # the EMA is not the raw model
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])


@needs_t91
def test_resume_after_sigkill_is_exact(reference_run, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(raw_config(**RESUME)))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "edtir", "train", str(cfg_file), "--output-dir", str(out), "--no-progress"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step_00000002").exists() and p.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before it could be killed"
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    assert (out / "model.safetensors").read_bytes() == (reference_run / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# Distributed

@needs_t91
def test_two_gloo_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes x batch 2 = 1 process x batch 4 (drop path off: it is drawn per rank)."""
    common = {"model": {"size": "T", "tasks": ["sr-x2"], "drop_path": 0.0}}
    one = raw_config(train={"batch": 4, "iterations": 3}, **common)
    two = raw_config(train={"batch": 2, "iterations": 3}, **common)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "edtir",
           "train", str(tmp_path / "two.yaml"), "--output-dir", str(tmp_path / "ddp"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("2 process(es)") == 1  # only rank 0 talks
    single = train(config_from_dict(one), tmp_path / "single", progress=False)
    a, b = tensors(single), tensors(tmp_path / "ddp" / "model.safetensors")
    torch.manual_seed(3)
    initial = make_model(config_from_dict(one)).state_dict()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    moved = torch.cat([(a[k] - initial[k]).abs().flatten() for k in a])
    # Same updates up to float rounding (gradients averaged over ranks in another order); Adam's normalisation
    # can magnify rounding where a gradient is near zero, hence a bound relative to the step size.
    assert moved.mean() > 1e-4
    assert diff.mean() < 1e-3 * moved.mean() and diff.max() < 0.1 * one["train"]["lr"], (diff.mean(), diff.max())
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step_00000002",
                                                                                     "step_00000003"]


def test_ema_warmup_forgets_the_initial_weights():
    """A plain 0.999 EMA keeps 0.999^1000 = 37% of the start after 1,000 steps; the warm-up keeps none of it,
    and from step ~10,000 on it is the plain decay again."""
    from edtir.train.state import EMA

    start, trained = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    plain, warm = EMA(start, 0.999), EMA(start, 0.999)
    for step in range(1, 1001):
        plain.update(trained)
        warm.update(trained, step)
    gap = lambda e: (e.module.weight - trained.weight).abs().max() / (start.weight - trained.weight).abs().max()  # noqa: E731
    assert abs(gap(plain).item() - 0.999**1000) < 1e-4
    assert gap(warm).item() < 1e-6
    assert warm.decay_at(1) == 2 / 11 and warm.decay_at(20_000) == 0.999 and warm.decay_at(None) == 0.999
