"""Reading and writing EDT weights: official ``.pth`` state dicts and edtir's own ``.safetensors``.

Official files are plain state dicts (sometimes nested under ``state_dict``/``params``/``params_ema`` or with a
``module.`` prefix). They carry the shift masks of every odd block as buffers (``attn_mask_h``/``attn_mask_v``,
computed for the training patch): we check them against the masks we compute, then drop them, since the model
computes masks for whatever size it is given. edtir files leave the masks out and carry the configuration as
metadata. Nothing here executes code from a file: ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from .edt import EDT, KEY_TASKS, SIZES, TASK_KEYS, EDTConfig, shift_mask

log = logging.getLogger(__name__)

MASK_RE = re.compile(r"^body\.layers\.(\d+)\.residual_group\.blocks\.(\d+)\.attn_mask_([hv])$")
HEAD_RE = re.compile(r"^head_([a-z]+_[A-Za-z0-9]+)\.")
TAIL_RE = re.compile(r"^tail_([a-z]+_[A-Za-z0-9]+)\.")
#: window pairs of the paper's ablations, tried in this order when a file's masks tell the window apart
KNOWN_WINDOWS = ((6, 24), (12, 12), (8, 8), (4, 16), (8, 16), (16, 16))
FORMAT = "edtir"


@dataclass
class LoadReport:
    """What a load kept and left out; ``model.load_report`` after :func:`load_model`."""

    source: str
    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # in the file, not used (other tasks' heads/tails)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file (left as initialised)
    mismatched: list[str] = field(default_factory=list)  # same name, other shape: skipped
    masks_checked: int = 0

    def summary(self) -> str:
        def groups(keys):
            return sorted({k.split(".")[0] for k in keys})

        parts = [f"{len(self.kept)} tensors loaded from {self.source}"]
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} ({', '.join(groups(self.dropped))})")
        if self.mismatched:
            parts.append(f"skipped {len(self.mismatched)} of another shape ({', '.join(self.mismatched[:4])}"
                         + (", ..." if len(self.mismatched) > 4 else "") + ")")
        if self.missing:
            parts.append(f"kept initial values for {len(self.missing)} ({', '.join(groups(self.missing))})")
        if self.masks_checked:
            parts.append(f"{self.masks_checked} shift-mask buffers verified")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------

def _unwrap(obj, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("params_ema", "params", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                log.info("%s: using the weights under %r", source, key)
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: not a state dict of tensors (not an EDT checkpoint)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) from an edtir ``.safetensors`` or an official ``.pth``; metadata is empty for .pth."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:  # permission denied, an unreadable disk
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(head) < 9:
        raise CheckpointError(f"{path}: file is empty or truncated")
    torch_file = head[:2] == b"PK" or head[:1] == b"\x80"  # zip (torch.save) or a legacy pickle
    if not torch_file and head[8:9] != b"{" and path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: not a checkpoint (neither a PyTorch nor a safetensors file)")
    if path.suffix == ".safetensors" or not torch_file:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            hint = "truncated or not a safetensors file" if path.suffix == ".safetensors" else "not a checkpoint"
            raise CheckpointError(f"{path}: cannot read ({hint}: {str(e).splitlines()[0]})") from None
        return _unwrap(sd, str(path)), meta
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says enough
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zips and pickles fail in many ways (KeyError, EOFError, ...)
        raise CheckpointError(f"{path}: {_load_failure(e)}") from None
    return _unwrap(obj, str(path)), {}


def _load_failure(e: Exception) -> str:
    """One line for a failed ``torch.load(weights_only=True)``: a refused pickle (one that would import a
    callable or use an opcode outside plain tensors and containers) or a damaged file."""
    text = str(e)
    if "weights only" in text.lower() or "weights_only" in text or "Unsupported global" in text:
        m = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", text)
        op = re.search(r"Unsupported operand (\d+)", text)
        what = (f"loading it would call {m.group(1)}" if m else
                f"pickle opcode {op.group(1)} is not one of plain tensors (a damaged file, or one that would run "
                "code)" if op else "it holds more than plain tensors")
        return (f"refused: {what}; checkpoints are loaded without running code (only tensors and plain "
                "containers are accepted)")
    msg = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"cannot read as a PyTorch checkpoint (truncated or not a checkpoint: {msg[:160]})"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


# ---------------------------------------------------------------------------------------------------------------
# Detection from keys and shapes
# ---------------------------------------------------------------------------------------------------------------

def _tasks_in(sd) -> list[str]:
    keys = {m.group(1) for k in sd for m in [HEAD_RE.match(k)] if m}
    unknown = sorted(keys - set(KEY_TASKS))
    if unknown:
        raise CheckpointError(f"unknown task head(s) in checkpoint: {', '.join('head_' + u for u in unknown)}")
    return [t for t in TASK_KEYS if TASK_KEYS[t] in keys]


def _detect_window(masks: dict[str, torch.Tensor]) -> tuple[tuple[int, int] | None, int | None]:
    """(window, token grid side) that reproduce the stored horizontal masks, or (None, None)."""
    mh = next((v for k, v in masks.items() if k.endswith("_h")), None)
    if mh is None or mh.ndim != 3:
        return None, None
    nw, n = mh.shape[0], mh.shape[1]
    side = math.isqrt(nw * n)
    if side * side != nw * n:
        return None, None
    for wh, ww in KNOWN_WINDOWS:
        if wh * ww == n and side % wh == 0 and side % ww == 0:
            if torch.equal(shift_mask(side, side, (wh, ww), (wh // 2, ww // 2)), mh.float()):
                return (wh, ww), side
    return None, side


def detect_config(sd: dict[str, torch.Tensor], *, window_size=None, heads=None) -> EDTConfig:
    """EDTConfig from an official-layout state dict: tasks, widths, depths, upsampler and the SF variant."""
    try:
        tasks = _tasks_in(sd)
        if not tasks or "body.patch_embed.norm.weight" not in sd:
            raise CheckpointError("no EDT heads/body found (keys like head_sr_x2.* and body.*)")
        first = TASK_KEYS[tasks[0]]
        nf = sd[f"head_{first}.0.weight"].shape[0]
        dim = sd["body.patch_embed.norm.weight"].shape[0]
        depths = []
        for i in range(10_000):
            blocks = {int(m.group(1)) for k in sd
                      for m in [re.match(rf"body\.layers\.{i}\.residual_group\.blocks\.(\d+)\.", k)] if m}
            if not blocks:
                break
            depths.append(max(blocks) + 1)
        sr = [t for t in tasks if t.startswith("sr")]
        upsampler = "pixelshuffle"
        if sr:
            direct = [f"tail_{TASK_KEYS[t]}.3.weight" not in sd for t in sr]
            if any(direct) != all(direct):
                raise CheckpointError("mixed SR upsamplers in one checkpoint are not supported")
            upsampler = "pixelshuffledirect" if direct[0] else "pixelshuffle"
        other = [t for t in tasks if not t.startswith("sr")]
        downsample = not other or f"head_{TASK_KEYS[other[0]]}.1.conv_down.weight" in sd
    except KeyError as e:
        raise CheckpointError(f"checkpoint lacks {e.args[0]!r}: not a complete EDT state dict") from None
    except (IndexError, TypeError, ValueError, AttributeError) as e:  # e.g. a 0-d tensor where a weight goes
        raise CheckpointError(f"checkpoint tensors have shapes no EDT has ({e})") from None
    size = None
    for name, (snf, sdim, sdepths, sheads, _) in SIZES.items():
        if (snf, sdim, tuple(sdepths)) == (nf, dim, tuple(depths)):
            size = name + ("" if downsample else "SF")
            heads = heads or sheads
    masks = {k: v for k, v in sd.items() if MASK_RE.match(k)}
    found, side = _detect_window(masks)
    window = tuple(window_size) if window_size else (found or (6, 24))
    mask_tokens = side or (48 if downsample else 144)
    try:
        return EDTConfig(tasks=tuple(tasks), num_feat=nf, embed_dim=dim, depths=tuple(depths), heads=heads or 6,
                         window_size=window, upsampler=upsampler, downsample=downsample, size=size,
                         mask_tokens=mask_tokens)
    except ValueError as e:
        raise CheckpointError(f"checkpoint does not describe a valid EDT: {e}") from None


def config_from_metadata(meta: dict[str, str]) -> EDTConfig | None:
    if meta.get("format") != FORMAT or "config" not in meta:
        return None
    try:
        raw = json.loads(meta["config"])
        for k in ("tasks", "depths", "window_size", "shift_size"):
            if raw.get(k) is not None:
                raw[k] = tuple(raw[k])
        return EDTConfig(**raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"bad edtir metadata in checkpoint: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Loading into a model
# ---------------------------------------------------------------------------------------------------------------

def _task_of_key(key: str) -> str | None:
    m = HEAD_RE.match(key) or TAIL_RE.match(key)
    return KEY_TASKS.get(m.group(1)) if m else None


def split_masks(model: EDT, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Remove the official mask buffers from ``sd`` after checking each equals the mask we compute."""
    cfg = model.cfg
    rest, n = {}, 0
    expected = {}
    for k, v in sd.items():
        m = MASK_RE.match(k)
        if not m:
            rest[k] = v
            continue
        layer, block = int(m.group(1)), int(m.group(2))
        if layer >= len(cfg.depths) or block >= cfg.depths[layer] or block % 2 == 0:
            raise CheckpointError(f"unexpected mask buffer {k} (block {block} of layer {layer} is not shifted)")
        if v.ndim != 3 or v.shape[1] != v.shape[2] or v.shape[1] != cfg.window_size[0] * cfg.window_size[1]:
            raise CheckpointError(f"{k}: shape {tuple(v.shape)} does not fit window {cfg.window_size}")
        side = math.isqrt(v.shape[0] * v.shape[1])
        if side not in expected:
            expected[side] = model.body.masks(side, side, torch.device("cpu"))
        want = expected[side][0 if m.group(3) == "h" else 1]
        if want.shape != v.shape or not torch.equal(want, v.float()):
            raise CheckpointError(f"{k}: stored shift mask differs from the one computed for window "
                                  f"{cfg.window_size} (wrong window_size?)")
        n += 1
    return rest, n


def _check_fit(model: EDT, sd: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    unknown = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
             if k in own and sd[k].shape != own[k].shape]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s) (e.g. {unknown[0]})")
    if missing:
        problems.append(f"{len(missing)} missing key(s) (e.g. {missing[0]})")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s) (e.g. {wrong[0]})")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))


def load_model(path_or_state_dict, *, tasks=None, window_size=None, heads=None, device="cpu") -> EDT:
    """A ready EDT in eval mode from an official ``.pth``, an edtir ``.safetensors`` or a state dict.

    ``tasks`` keeps the shared body and only the named tasks' heads and tails (what was dropped is logged and
    kept in ``model.load_report``); ``window_size``/``heads`` override what the file cannot tell."""
    if isinstance(path_or_state_dict, dict):
        sd, meta, source = _unwrap(path_or_state_dict, "state dict"), {}, "state dict"
    else:
        source = str(path_or_state_dict)
        sd, meta = read_checkpoint(path_or_state_dict)
    cfg = config_from_metadata(meta)
    if cfg is None:
        cfg = detect_config(sd, window_size=window_size, heads=heads)
    else:
        over = {k: v for k, v in (("window_size", window_size), ("heads", heads)) if v is not None}
        if over:
            try:
                cfg = cfg.replace(**over, shift_size=None) if "window_size" in over else cfg.replace(**over)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
    report = LoadReport(source=source)
    if tasks is not None:
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        absent = [t for t in tasks if t not in cfg.tasks]
        if absent:
            raise CheckpointError(f"{source} has no {', '.join(absent)} (it has: {', '.join(cfg.tasks)})")
        report.dropped = [k for k in sd if _task_of_key(k) not in (None, *tasks)]
        sd = {k: v for k, v in sd.items() if _task_of_key(k) in (None, *tasks)}
        cfg = cfg.replace(tasks=tuple(tasks))
    model = EDT(cfg)
    sd, report.masks_checked = split_masks(model, sd)
    _check_fit(model, sd, source)
    model.load_state_dict(sd, strict=True)
    report.kept = list(sd)
    if report.dropped:
        log.info("load_model: %s", report.summary())
    model.load_report = report
    return model.to(device).eval()


def load_partial(model: EDT, path_or_state_dict, tasks=None, heads_from=None) -> LoadReport:
    """Fine-tuning start: load the body and the named tasks' heads/tails (default: the model's tasks) from a
    checkpoint into ``model``. Tensors of another shape in a head/tail are skipped and reported (the official
    EDT-T multi-task file has another upsampler than the EDT-T fine-tuning models); the body must fit.

    ``heads_from`` ({model task: file task}) starts a task from another task's head and tail, e.g. denoising at
    sigma 15 from a sigma-25 model: closer to the goal than a fresh head, and the shapes match within a kind."""
    if isinstance(path_or_state_dict, dict):
        sd, source = _unwrap(path_or_state_dict, "state dict"), "state dict"
    else:
        source = str(path_or_state_dict)
        sd = read_state_dict(path_or_state_dict)
    tasks = list(model.tasks if tasks is None else ([tasks] if isinstance(tasks, str) else tasks))
    sd = {k: v for k, v in sd.items() if not MASK_RE.match(k)}
    if heads_from:
        sd = _heads_renamed(sd, dict(heads_from), source, tasks)
    own = model.state_dict()
    report = LoadReport(source=source)
    take = {}
    for k, v in sd.items():
        t = _task_of_key(k)
        if t is not None and t not in tasks:
            report.dropped.append(k)
        elif k not in own:
            if t is None:
                raise CheckpointError(f"{source}: body key {k} is not in the model (another size or depth?)")
            report.dropped.append(k)
        elif own[k].shape != v.shape:
            if t is None:
                raise CheckpointError(f"{source}: body tensor {k} has shape {tuple(v.shape)}, the model "
                                      f"{tuple(own[k].shape)} (another size?)")
            report.mismatched.append(k)
        else:
            take[k] = v
    body_missing = [k for k in own if k not in take and _task_of_key(k) is None]
    if body_missing:
        raise CheckpointError(f"{source}: the body is incomplete ({len(body_missing)} tensors missing, "
                              f"e.g. {body_missing[0]})")
    model.load_state_dict(take, strict=False)
    report.kept = list(take)
    report.missing = [k for k in own if k not in take]
    log.info("load_partial: %s", report.summary())
    model.load_report = report
    return report


def _heads_renamed(sd: dict, heads_from: dict[str, str], source: str, tasks: list[str]) -> dict:
    """The state dict with each target task's head/tail replaced by a copy of its source task's. A source that is
    not itself among ``tasks`` leaves under its own name, so the report does not call a head it used "dropped"."""
    found = {_task_of_key(k) for k in sd}
    absent = sorted({t for t in heads_from.values() if t not in found})
    if absent:
        raise CheckpointError(f"{source} has no {', '.join(absent)} head to start from "
                              f"(it has: {', '.join(sorted(t for t in found if t)) or 'no task'})")
    replaced = set(heads_from) | {t for t in heads_from.values() if t not in tasks}
    out = {k: v for k, v in sd.items() if _task_of_key(k) not in replaced}
    for target, src in heads_from.items():
        for k, v in sd.items():
            if _task_of_key(k) == src:
                part, rest = k.split(".", 1)
                out[f"{part.split('_', 1)[0]}_{TASK_KEYS[target]}.{rest}"] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

def _atomic(path: Path, write) -> Path:
    from ..data.io import atomic_write_bytes

    atomic_write_bytes(path, write)
    return path


def config_metadata(cfg: EDTConfig) -> dict[str, str]:
    return {"format": FORMAT, "config": json.dumps(asdict(cfg))}


def _sort_safetensors_metadata(path: str | os.PathLike) -> None:
    """Rewrite the header with sorted metadata: safetensors writes its metadata map in a random order per
    process, and the same weights should give the same bytes (exact-resume checks compare files)."""
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # same content, so the same length; pad with spaces as safetensors does
            f.seek(8)
            f.write(text + b" " * (n - len(text)))


def save_model(model: EDT, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """edtir ``.safetensors``: weights without the mask buffers, the configuration as metadata. Atomic, and
    byte-deterministic for the same weights and metadata."""
    from safetensors.torch import save_file

    model = getattr(model, "module", model)  # DDP
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = config_metadata(model.cfg)
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)

    def write(tmp):
        save_file(sd, tmp, metadata=meta)
        _sort_safetensors_metadata(tmp)

    return _atomic(Path(path), write)


def official_state_dict(model: EDT) -> dict[str, torch.Tensor]:
    """The official layout: the state dict with mask buffers (for the training patch) before each odd block."""
    model = getattr(model, "module", model)
    side = model.cfg.mask_tokens
    mh, mv = model.body.masks(side, side, torch.device("cpu"))
    out = {}
    for k, v in model.state_dict().items():
        m = re.match(r"^(body\.layers\.\d+\.residual_group\.blocks\.(\d+)\.)norm1\.weight$", k)
        if m and int(m.group(2)) % 2 == 1:
            out[m.group(1) + "attn_mask_h"] = mh.clone()
            out[m.group(1) + "attn_mask_v"] = mv.clone()
        out[k] = v.detach().cpu()
    return out


def save_official(model: EDT, path: str | os.PathLike) -> Path:
    """A ``.pth`` in the official EDT format (plain state dict, mask buffers included), loadable by the official
    test scripts. Atomic."""
    sd = official_state_dict(model)
    return _atomic(Path(path), lambda tmp: torch.save(sd, tmp))
