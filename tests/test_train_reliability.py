"""Training never costs the last good checkpoint: a nan loss stops the run before anything is written from it,
SIGINT/SIGTERM save a checkpoint and exit 130/143, a run killed with SIGKILL half-way through a checkpoint
resumes from the previous one, and damaged checkpoints are skipped on --resume."""

import json
import logging
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
from test_train import T91, raw_config  # EDT-T x2 on T91, 4 steps of 2 patches, a checkpoint every 2 steps

from edtir.cli import main
from edtir.errors import Interrupted, TrainingStopped
from edtir.train import loop, state
from edtir.train.config import config_from_dict
from edtir.train.loop import train

pytestmark = pytest.mark.skipif(not T91.is_dir(), reason=f"{T91} not found (tests read ../shared)")


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(raw_config(**sections)))
    return path


def train_cmd(cfg: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "edtir", "train", str(cfg), "--output-dir", str(out), "--no-progress", *extra]


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("edtir train:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of raw_config(): what every resumed run must end with, byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "run"
    n = torch.get_num_threads()
    train(config_from_dict(raw_config()), out, progress=False)
    torch.set_num_threads(n)
    return out


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def same_final(out: Path, reference: Path) -> bool:
    return (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# Non-finite loss and weights


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # A real divergence: the LR jumps to 1e37 after step 1, the step-2 update overflows, step 3's loss is nan.
    cfg = config_from_dict(raw_config(train={"milestones": [1], "gamma": 1e40, "iterations": 5},
                                      checkpoint={"every": 1}))
    with pytest.raises(TrainingStopped) as e:
        train(cfg, tmp_path / "run", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "loss is nan at step 3" in msg and "step_00000002" in msg, msg
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000001",
                                                                                     "step_00000002"]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert state.verify_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002", 2) is None
    logged = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2]  # the nan step is not logged as if it were a result


def test_nan_weights_with_a_finite_loss_write_nothing(tmp_path, monkeypatch, capsys):
    real = loop.train_step
    calls = []

    def poisoned(step_module, *args):
        loss, losses = real(step_module, *args)
        calls.append(1)
        if len(calls) == 2:  # the update of step 2 (a checkpoint step) breaks a weight
            with torch.no_grad():
                next(step_module.parameters()).view(-1)[0] = float("inf")
        return loss, losses  # the loss of the step is finite: only the weights check can see it

    monkeypatch.setattr(loop, "train_step", poisoned)
    cfg = write_config(tmp_path / "c.yaml", train={"iterations": 2})
    assert main(["train", str(cfg), "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 1
    err = one_line(capsys.readouterr().err)
    assert "weights became nan/inf" in err and "at step 2" in err and "no checkpoint was written" in err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# Signals


def test_sigint_saves_a_checkpoint_at_the_current_step(tmp_path, monkeypatch, capsys, caplog, reference):
    """Ctrl-C in step 3 saves step 3; then that checkpoint is damaged, and --resume goes back to step 2 and
    still ends with the bytes of an uninterrupted run."""
    real = loop.train_step
    calls = []

    def ctrl_c_at_step_3(*args):
        calls.append(1)
        out = real(*args)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 3
        return out

    monkeypatch.setattr(loop, "train_step", ctrl_c_at_step_3)
    cfg = write_config(tmp_path / "c.yaml")
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under `nohup ... &`
    with pytest.raises(Interrupted) as e:
        train(config_from_dict(raw_config()), out, progress=False)
    assert e.value.exit_code == 130 and "SIGINT: stopped after step 3" in str(e.value)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    folder = out / "checkpoints" / "step_00000003"  # not a checkpoint step: written because of the signal
    assert state.verify_checkpoint(folder, 3) is None and not (out / "model.safetensors").exists()
    monkeypatch.setattr(loop, "train_step", real)
    truncate(folder / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(cfg), "--output-dir", str(out), "--no-progress", "--resume"]) == 0
    assert "step_00000003: damaged checkpoint" in caplog.text
    assert "resumed from" in capsys.readouterr().err and same_final(out, reference)
    assert state.verify_checkpoint(out / "checkpoints" / "step_00000004", 4) is None


def test_sigterm_to_the_process_group_saves_and_exits_143(tmp_path):
    """SIGTERM to the trainer and its data-loading worker (as a job scheduler sends it)."""
    cfg = write_config(tmp_path / "c.yaml", train={"iterations": 1000, "workers": 1}, checkpoint={"every": 1000})
    out = tmp_path / "run"
    p = subprocess.Popen(train_cmd(cfg, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    log = out / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().strip()) and p.poll() is None:
        assert time.monotonic() < deadline, "no step after 120 s"
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    line = one_line(err)
    assert "interrupted: SIGTERM: stopped after step" in line and "--resume" in line
    [folder] = (out / "checkpoints").iterdir()
    step = int(folder.name.split("_")[1])
    assert step >= 1 and state.verify_checkpoint(folder, step) is None
    assert not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# Killed while writing; damaged checkpoints


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path, reference, capsys):
    cfg = write_config(tmp_path / "c.yaml")
    out = tmp_path / "run"
    env = {**os.environ, state.PAUSE_ENV: "checkpoint-4"}  # stop after model.safetensors, before state.pt
    p = subprocess.Popen(train_cmd(cfg, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)
    lines = []
    for line in p.stderr:  # the hook says where it stopped
        lines.append(line)
        if "paused at checkpoint-4" in line:
            break
    assert lines and "paused at checkpoint-4" in lines[-1], "".join(lines)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    [partial] = (out / "checkpoints").glob(".tmp-step_00000004-*")
    assert (partial / "model.safetensors").exists() and not (partial / "state.pt").exists()
    assert sorted(x.name for x in (out / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert main(["train", str(cfg), "--output-dir", str(out), "--no-progress", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "step_00000002" in err
    assert same_final(out, reference)
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the partial write was swept away


def test_resume_follows_the_configs_schedule_not_the_checkpoints(reference, tmp_path, capsys):
    """A run shortened or re-planned between sittings gets the new milestones (the checkpoint saves the old ones):
    resumed at step 2 with the LR now halved at 2, it ends as a fresh run of that config does, not as the
    reference (halved at 3)."""
    changed = {"train": {"milestones": [2]}}
    fresh = tmp_path / "fresh"
    train(config_from_dict(raw_config(**changed)), fresh, progress=False)
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    cfg = write_config(tmp_path / "c.yaml", **changed)
    assert main(["train", str(cfg), "--output-dir", str(out), "--no-progress", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "step_00000002" in err
    assert "schedule changed since the checkpoint (milestones [3] -> [2])" in err and "LR now 0.0005" in err, err
    assert (out / "model.safetensors").read_bytes() == (fresh / "model.safetensors").read_bytes()
    assert not same_final(out, reference)


def without_manifest(damage):
    def go(path: Path) -> None:
        (path.parent / state.MANIFEST_FILE).unlink()  # a checkpoint written before manifests: still checked
        damage(path)

    return go


DAMAGE = {
    "truncated state": ("state.pt", truncate, "bytes, the manifest says"),
    "truncated weights": ("model.safetensors", truncate, "bytes, the manifest says"),
    "flipped byte": ("model.safetensors", flip_a_byte, "SHA-256"),
    "missing state": ("state.pt", Path.unlink, "state.pt missing"),
    "garbage manifest": ("manifest.json", lambda p: p.write_text("{not json"), "unreadable manifest.json"),
    "old, truncated weights": ("model.safetensors", without_manifest(truncate), "not a valid safetensors"),
    "old, truncated state": ("state.pt", without_manifest(truncate), "state.pt does not load"),
}


def test_resume_refuses_when_every_checkpoint_is_damaged(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    for folder in (out / "checkpoints").iterdir():
        truncate(folder / "state.pt")
    cfg = write_config(tmp_path / "c.yaml")
    assert main(["train", str(cfg), "--output-dir", str(out), "--no-progress", "--resume"]) == 1
    assert "every checkpoint is damaged" in one_line(capsys.readouterr().err)
    assert not (out / "model.safetensors").exists()  # nothing started over them


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(case, reference, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    name, damage, reason = DAMAGE[case]
    damage(out / "checkpoints" / "step_00000004" / name)
    with caplog.at_level(logging.WARNING):
        folder, saved = state.load_latest(out)
    assert folder.name == "step_00000002" and saved["step"] == 2
    assert "step_00000004: damaged checkpoint" in caplog.text and reason in caplog.text, caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Errors before any work


def test_config_and_output_dir_errors_are_one_line_before_any_work(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml")
    assert main(["train", str(cfg), "train.lerning_rate=1e-4"]) == 2
    assert "train.lerning_rate" in one_line(capsys.readouterr().err)
    (tmp_path / "taken").write_text("a file where the run folder should go")
    assert main(["train", str(cfg), "--output-dir", str(tmp_path / "taken" / "run")]) == 1
    line = one_line(capsys.readouterr().err)
    assert "taken" in line and "cannot write" in line
    with pytest.raises(SystemExit) as e:
        main(["train", str(cfg), "--resum-from", "x"])
    assert e.value.code == 2
