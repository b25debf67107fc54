"""Checkpoints, resume, RNG states and EMA.

A checkpoint is a folder ``<output>/checkpoints/step_<N>/`` with

* ``model.safetensors``: the weights to use (the EMA weights when EMA is on), for ``edtir.load_model``;
* ``state.pt``: what training needs to continue: raw weights, optimizer, scheduler, EMA, step, best validation
  score, and every RNG (Python, NumPy, torch CPU and CUDA, one set per rank).

* ``manifest.json``: size and SHA-256 of the two files, written last.

Both files are written into a hidden temporary folder, each file itself atomically (temporary name, fsync,
``os.replace``), and the folder is renamed into place last, so a ``step_<N>`` folder either holds a complete
checkpoint or does not exist; the new checkpoint is read back and checked against its manifest before older
ones are pruned. ``--resume`` takes the newest checkpoint that passes :func:`verify_checkpoint` (manifest
sizes and checksums, a valid safetensors file, a state file that loads) and warns about each damaged one it
skips; leftovers of a killed write are swept away on start."""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..data.io import atomic_write_bytes
from ..errors import CheckpointError

log = logging.getLogger(__name__)

STATE_FORMAT = "edtir-train-state/1"
CKPT_RE = re.compile(r"^step_(\d{8,})$")
MODEL_FILE, STATE_FILE, MANIFEST_FILE = "model.safetensors", "state.pt", "manifest.json"
MANIFEST_FORMAT = "edtir-checkpoint/1"
#: Test hook: with EDTIR_TEST_PAUSE=checkpoint-<step> a run stops (sleeps) half-way through writing that
#: checkpoint, after saying so on stderr, so that a test can kill it at that exact moment.
PAUSE_ENV = "EDTIR_TEST_PAUSE"


# ------------------------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of a model's weights, kept in a frozen copy of the model (used to validate
    and to save).

    With ``step`` given, the decay warms up as min(decay, (1 + step) / (10 + step)): a plain 0.999 still holds
    37% of the initial weights after 1,000 steps, which made short runs publish a half-trained average."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int | None) -> float:
        return self.decay if step is None else min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), 1.0 - self.decay_at(step))
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd)


# ------------------------------------------------------------------------------------------------------------
# RNG states
# ------------------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """Every RNG of this process, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one rank: drop path (and anything else drawn from torch's RNG during a
    step) depends on (seed, step, rank) only, so a resumed run draws what an uninterrupted one did."""
    return int(np.random.SeedSequence([seed, step, rank, 3]).generate_state(1, np.uint64)[0] >> 1)


# ------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------

def save_weights(model, path: Path, metadata: dict | None = None) -> Path:
    """``edtir.save_model``: atomic, fsynced, byte-deterministic ``.safetensors``."""
    from ..models.checkpoint import save_model

    return save_model(model, path, metadata=metadata)


def checkpoints_dir(output: Path) -> Path:
    return Path(output) / "checkpoints"


def _step_folders(output: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step_<N>`` folder, complete or not, oldest first."""
    root = checkpoints_dir(output)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() for m in [CKPT_RE.match(p.name)] if m and p.is_dir())


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (both files present), oldest first."""
    return [(step, p) for step, p in _step_folders(output)
            if (p / MODEL_FILE).is_file() and (p / STATE_FILE).is_file()]


def sweep_partial(output: Path) -> None:
    """Remove what a killed write left behind (hidden temporary folders and files)."""
    root = checkpoints_dir(output)
    for folder in (root, Path(output)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".tmp-step_") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                p.unlink(missing_ok=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path, step: int) -> dict:
    return {"format": MANIFEST_FORMAT, "step": step,
            "files": {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
                      for name in (MODEL_FILE, STATE_FILE)}}


def test_pause(point: str) -> None:
    """The EDTIR_TEST_PAUSE hook (see :data:`PAUSE_ENV`); does nothing unless the variable names ``point``."""
    if os.environ.get(PAUSE_ENV) == point:
        print(f"{PAUSE_ENV}: paused at {point}", file=sys.stderr, flush=True)
        time.sleep(3600)


def save_checkpoint(output: Path, step: int, *, model, out_model, optimizer, scheduler, ema, rng: list,
                    best: dict | None, keep: int, metadata: dict | None = None) -> Path:
    """Write checkpoint ``step`` (see the module docstring); prune to the newest ``keep`` (0 keeps all) once it
    has been read back intact."""
    root = checkpoints_dir(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(out_model, tmp / MODEL_FILE, metadata={"step": step, **(metadata or {})})
    test_pause(f"checkpoint-{step}")
    state = {"format": STATE_FORMAT, "step": step, "model": _cpu(model.state_dict()),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "ema": _cpu(ema.state_dict()) if ema is not None else None, "rng": rng, "best": best}
    atomic_write_bytes(tmp / STATE_FILE, lambda p: torch.save(state, p))
    text = json.dumps(_manifest(tmp, step), indent=1) + "\n"
    atomic_write_bytes(tmp / MANIFEST_FILE, lambda p: Path(p).write_text(text))
    if final.exists():  # re-written after resuming from an older checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    problem = verify_checkpoint(final, step, load_state=False)
    if problem:  # the disk did not keep what was written: keep every older checkpoint
        raise CheckpointError(f"{final}: damaged right after writing ({problem}); older checkpoints kept")
    if keep:
        for _, old in list_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _cpu(sd: dict) -> dict:
    return {k: v.detach().cpu() for k, v in sd.items()}


def verify_checkpoint(folder: Path, step: int, *, load_state: bool = True) -> str | None:
    """Why checkpoint ``folder`` (of ``step``) cannot be resumed from, or None when it is intact: both files
    present, sizes and SHA-256 as in its manifest (checkpoints written before manifests existed skip this
    check), the weights a valid safetensors file of that step, and (``load_state``) a state file that loads
    without running code, of the right format and step."""
    return _check(folder, step, load_state)[0]


def _check(folder: Path, step: int, load_state: bool) -> tuple[str | None, dict | None]:
    missing = [n for n in (MODEL_FILE, STATE_FILE) if not (folder / n).is_file()]
    if missing:
        return f"{' and '.join(missing)} missing", None
    man_path = folder / MANIFEST_FILE
    if man_path.exists():
        try:
            man = json.loads(man_path.read_text())
            files = man["files"]
            if man.get("format") != MANIFEST_FORMAT or man.get("step") != step:
                return f"{MANIFEST_FILE} is not the manifest of step {step}", None
            for name in (MODEL_FILE, STATE_FILE):
                size = (folder / name).stat().st_size
                if size != files[name]["bytes"]:
                    return f"{name} has {size:,} bytes, the manifest says {files[name]['bytes']:,} (truncated?)", None
                if sha256(folder / name) != files[name]["sha256"]:
                    return f"{name} does not match its SHA-256 checksum", None
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable {MANIFEST_FILE} ({type(e).__name__})", None
    try:
        from safetensors import safe_open

        with safe_open(str(folder / MODEL_FILE), framework="pt") as f:  # checks the header and the sizes
            meta = f.metadata() or {}
        if meta.get("step") not in (None, str(step)):
            return f"{MODEL_FILE} is the model of step {meta.get('step')}", None
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: a damaged file either way
        return f"{MODEL_FILE} is not a valid safetensors file ({str(e).splitlines()[0][:120]})", None
    if not load_state:
        return None, None
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zips and pickles fail in many ways
        return f"{STATE_FILE} does not load ({str(e).strip().splitlines()[0][:120] if str(e).strip() else e})", None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("step") != step:
        return f"{STATE_FILE} is not an edtir training state of step {step}", None
    return None, state


def load_latest(output: Path) -> tuple[Path, dict] | None:
    """(folder, state) of the newest checkpoint that passes :func:`verify_checkpoint`; each damaged or
    incomplete newer one is skipped with a warning. None when there is none."""
    for step, folder in reversed(_step_folders(output)):
        problem, state = _check(folder, step, load_state=True)
        if problem is None:
            return folder, state
        log.warning("%s: damaged checkpoint (%s); skipped, trying an older one", folder, problem)
    return None


def apply_schedule(scheduler, *, lr: float, milestones: list[int], gamma: float) -> str | None:
    """Make a resumed MultiStepLR follow the config's schedule, not the one saved in the checkpoint.

    ``load_state_dict`` brings back the saved milestones, gamma and base LR, so a run resumed with a changed
    schedule (shortened, say) would silently keep the old one. The config wins, as everywhere else; the LR of the
    current step is recomputed from it. Returns a line saying what changed, or None when nothing did."""
    old_lr, old_milestones, old_gamma = scheduler.base_lrs[0], sorted(scheduler.milestones.elements()), scheduler.gamma
    new_milestones = sorted(milestones)
    if (old_lr, old_milestones, old_gamma) == (lr, new_milestones, gamma):
        return None
    scheduler.milestones, scheduler.gamma = Counter(milestones), gamma
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    now = lr * gamma ** bisect.bisect_right(new_milestones, scheduler.last_epoch)
    for group in scheduler.optimizer.param_groups:  # the next scheduler.step() starts from these
        group["initial_lr"], group["lr"] = lr, now
    changed = [f"{name} {a} -> {b}" for name, a, b in (("lr", f"{old_lr:g}", f"{lr:g}"),
                                                       ("milestones", old_milestones, new_milestones),
                                                       ("gamma", f"{old_gamma:g}", f"{gamma:g}")) if a != b]
    return f"schedule changed since the checkpoint ({', '.join(changed)}): the config's applies, LR now {now:g}"


def restore(state: dict, *, model, optimizer, scheduler, ema, rank: int, world: int) -> None:
    """Put a loaded training state back into the objects of a fresh run (same config)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            if state["ema"] is None:
                raise CheckpointError("the checkpoint was written without EMA but train.ema is set now")
            ema.load_state_dict(state["ema"])
    except (RuntimeError, ValueError, KeyError) as e:
        why = str(e).splitlines()[0]
        raise CheckpointError(f"cannot resume: the checkpoint does not fit this config ({why})") from None
    rngs = state.get("rng") or []
    if len(rngs) == world:
        set_rng_state(rngs[rank])
    elif rngs:
        log.warning("checkpoint written by %d processes, resuming with %d: RNG states not restored (the data "
                    "stream and drop path are keyed by step and rank, so only the rank split changes)",
                    len(rngs), world)
