"""Training configs: YAML -> nested dataclasses, checked key by key.

A config is data. Every key is declared below with its type and default, so a typo (``train.lerning_rate``) or
a wrong type (``train.lr: fast``) is a :class:`~edtir.errors.ConfigError` that names the full key path, not a
silent default. ``key.path=value`` overrides (values parsed as YAML) are applied to the raw mapping before
validation, so they are checked the same way and beat the file.

Layout (see ``configs/*.yaml``)::

    base                               (another config file this one lists differences from; see read_raw)
    name, output_dir
    model:      size, tasks, window_size, upsampler, sf, drop_path
    data:       one entry per task: folders, recursive, subset, exclude, paired, patch, degradation, ...
    train:      batch, iterations, lr, milestones, gamma, betas, weights, loss, losses, grad_clip, ema, ...
    checkpoint: every, keep
    val:        folder, task, every, max_images
    log:        every, tensorboard
    init:       path, tasks, body, heads_from
                                       (fine-tuning: start from a checkpoint, keep the body and these tasks;
                                        body: then take the body alone from another checkpoint;
                                        heads_from: {task: file's task}, e.g. denoise-15 from denoise-25)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from ..data.degrade import RAIN_PRESETS
from ..errors import ConfigError, UsageError
from ..models.edt import TASKS, task_kind, task_scale

#: pixel losses a task can train with. L1 is the paper's; L2 for sparse residuals such as light rain, where L1's
#: gradient (the sign of the error at every pixel) holds the output at the input: fine-tuning on four crops of our
#: light rain, L1 left the loss at the rainy input's while L2 went 26.8 -> 32.0 dB in 100 steps
#: (``benchmarks/derain_overfit.py --loss``).
LOSSES = ("l1", "l2")

# ------------------------------------------------------------------------------------------------------------
# Schema
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    size: str = "T"  # T, S, B or L
    tasks: list[str] = field(default_factory=lambda: ["sr-x2"])
    window_size: list[int] = field(default_factory=lambda: [6, 24])
    upsampler: str | None = None  # None: the size's default (T: pixelshuffledirect, else pixelshuffle)
    sf: bool = False  # EDT-SF: denoise/derain heads without downsampling
    drop_path: float = 0.1  # stochastic depth rate (linear over all blocks)


@dataclass
class TaskDataConfig:
    """Where one task's training pairs come from. Clean images in ``folders`` are degraded on the fly;
    ``paired`` folders hold real pairs (``<folder>/<paired_input>/x.png`` with
    ``<folder>/<paired_target>/x.png``)."""

    folders: list[str] = field(default_factory=list)
    recursive: bool = True  # look into subfolders (ImageNet-style train folders)
    subset: int | None = None  # random subset of N images (seeded by train.seed), e.g. the paper's 200K
    exclude: list[str] = field(default_factory=list)  # text files listing image names (stems) to leave out
    paired: list[str] = field(default_factory=list)
    paired_input: str = "rainy"
    paired_target: str = "clean"
    patch: int | None = None  # input patch side; None: 48 for SR (LR side), 192 for denoise/derain
    degradation: str = "auto"  # auto (from the task), bicubic, noise, rain
    noise_sigma: float | None = None  # 0-255 scale; None: from the task name (denoise-25 -> 25)
    rain: str | None = None  # a preset of edtir.data.degrade.RAIN_PRESETS; None: from the task


@dataclass
class TrainConfig:
    batch: int = 4  # images per task per process (the paper: 4 per GPU per task)
    iterations: int = 500_000
    lr: float = 2e-4
    milestones: list[int] = field(default_factory=lambda: [250_000, 400_000, 450_000, 475_000])
    gamma: float = 0.5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    weights: dict[str, float] = field(default_factory=dict)  # loss weight per task (default 1.0)
    loss: str = "l1"  # pixel loss of every task: l1 or l2 (mean squared error)
    losses: dict[str, str] = field(default_factory=dict)  # per-task override, e.g. {derain-light: l2}
    grad_clip: float | None = None  # max global grad norm; None: off
    ema: float | None = None  # EMA decay (e.g. 0.999); None: off
    ema_warmup: bool = True  # decay min(ema, (1 + step) / (10 + step)): short runs don't publish the init
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU), fp32, bf16
    seed: int = 0
    workers: int = 4  # data-loading processes per training process
    image_cache_mb: float = 256  # decoded training images kept per data process (0: decode every time)
    device: str = "auto"  # auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK)
    threads: int | None = None  # torch CPU threads per process; None: torch's default


@dataclass
class CheckpointConfig:
    every: int = 5000
    keep: int = 3  # newest checkpoints kept on disk; 0 keeps all


@dataclass
class ValConfig:
    folder: str | None = None  # HR folder (SR), clean folder (denoise) or rainy/clean pair folder (derain)
    task: str | None = None  # None: the first task
    every: int = 5000
    max_images: int | None = None


@dataclass
class LogConfig:
    every: int = 100
    tensorboard: bool = True  # when the tensorboard package is installed


@dataclass
class InitConfig:
    path: str | None = None  # edtir .safetensors or official .pth
    tasks: list[str] | None = None  # heads/tails to keep; None: every task of the model found in the file
    body: str | None = None  # then the body alone from this checkpoint (a better-trained body under path's heads)
    heads_from: dict[str, str] | None = None  # {task: file's task}: start a task from another task's head and tail


@dataclass
class Config:
    name: str = "edt"  # from a file: the file's stem unless it says (read_raw)
    output_dir: str | None = None  # default runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: dict[str, TaskDataConfig] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    val: ValConfig = field(default_factory=ValConfig)
    log: LogConfig = field(default_factory=LogConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def task_data(self, task: str) -> TaskDataConfig:
        return self.data[task]

    def patch(self, task: str) -> int:
        """Input patch side of a task (LR side for SR)."""
        p = self.data[task].patch
        return p if p is not None else (48 if task_kind(task) == "sr" else 192)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------------------
# Raw mapping -> dataclasses, with the full key path in every error
# ------------------------------------------------------------------------------------------------------------

_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(tp) -> str:
    if tp in _TYPE_WORDS:
        return _TYPE_WORDS[tp]
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in args) + " (or null)"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _coerce(value: Any, tp, path: str):
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{path}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # optional: the inner error names the exact key (init.heads_from.sr-x2, not the map)
            return _coerce(value, real[0], path)
        for a in real:
            try:
                return _coerce(value, a, path)
            except ConfigError:
                pass
        raise bad
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, item = typing.get_args(tp)
        return {str(k): _coerce(v, item, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) >= 1000:  # 5e5 written in YAML
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")


def _build(cls, raw: Any, path: str):
    where = path or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean '{path + '.' if path else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{full}'{hint}; allowed under {where}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------------------
# Checks across keys
# ------------------------------------------------------------------------------------------------------------

def _check(cfg: Config) -> Config:
    from ..models.edt import SIZES

    m, t = cfg.model, cfg.train
    if m.size.upper().replace("EDT-", "") not in SIZES:
        raise ConfigError(f"model.size: unknown size {m.size!r}; expected one of T, S, B, L")
    if not m.tasks:
        raise ConfigError("model.tasks: at least one task is needed")
    for i, task in enumerate(m.tasks):
        if task not in TASKS:
            raise ConfigError(f"model.tasks[{i}]: unknown task {task!r}; expected one of: {' '.join(TASKS)}")
    if len(set(m.tasks)) != len(m.tasks):
        raise ConfigError(f"model.tasks: duplicate tasks in {m.tasks}")
    if len(m.window_size) != 2 or min(m.window_size) < 1:
        raise ConfigError(f"model.window_size: expected [rows, cols], got {m.window_size}")
    if m.upsampler not in (None, "pixelshuffle", "pixelshuffledirect"):
        raise ConfigError(f"model.upsampler: expected pixelshuffle or pixelshuffledirect, got "
                          f"{m.upsampler!r}")
    if not 0.0 <= m.drop_path < 1.0:
        raise ConfigError(f"model.drop_path: expected a rate in [0, 1), got {m.drop_path}")

    for key in cfg.data:
        if key not in m.tasks:
            raise ConfigError(f"data.{key}: not a task of this model (model.tasks: {', '.join(m.tasks)})")
    lcm = m.window_size[0] * m.window_size[1] // _gcd(*m.window_size)
    grids = {}
    for task in m.tasks:
        if task not in cfg.data:
            raise ConfigError(f"data.{task}: missing (every task in model.tasks needs its training data)")
        d = cfg.data[task]
        p = f"data.{task}"
        if not d.folders and not d.paired:
            raise ConfigError(f"{p}.folders: give at least one image folder (or {p}.paired)")
        if d.subset is not None and d.subset < 1:
            raise ConfigError(f"{p}.subset: expected a positive number of images, got {d.subset}")
        if d.paired and task_scale(task) != 1:
            raise ConfigError(f"{p}.paired: paired folders are for denoise/derain tasks (same-size pairs)")
        if d.degradation not in ("auto", "bicubic", "noise", "rain"):
            raise ConfigError(f"{p}.degradation: expected auto, bicubic, noise or rain, got "
                              f"{d.degradation!r}")
        deg = degradation_of(cfg, task)
        if (deg == "bicubic") != (task_kind(task) == "sr"):
            raise ConfigError(f"{p}.degradation: {deg} does not fit task {task}")
        if d.rain is not None and d.rain not in RAIN_PRESETS:
            raise ConfigError(f"{p}.rain: expected one of {', '.join(RAIN_PRESETS)}, got {d.rain!r}")
        if d.noise_sigma is not None and d.noise_sigma < 0:
            raise ConfigError(f"{p}.noise_sigma: must be >= 0")
        patch = cfg.patch(task)
        down = task_kind(task) != "sr" and not m.sf
        multiple = lcm * (4 if down else 1)
        if patch < 1 or patch % multiple:
            why = f"window {m.window_size[0]}x{m.window_size[1]}" + (", heads downsample x4" if down else "")
            raise ConfigError(f"{p}.patch: {patch} must be a positive multiple of {multiple} for {task} "
                              f"({why})")
        grids[task] = patch // 4 if down else patch
    if len(set(grids.values())) > 1:
        raise ConfigError("data.*.patch: multi-task training sends every task through the body in one batch, "
                          f"so all token grids must match; got {grids} (e.g. SR 48 with denoise/derain 192)")

    if t.batch < 1:
        raise ConfigError(f"train.batch: expected >= 1, got {t.batch}")
    if t.iterations < 0:
        raise ConfigError(f"train.iterations: expected >= 0, got {t.iterations}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr: expected > 0, got {t.lr}")
    if list(t.milestones) != sorted(t.milestones):
        raise ConfigError(f"train.milestones: must be increasing, got {t.milestones}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas: expected two values in [0, 1), got {t.betas}")
    for key in t.weights:
        if key not in m.tasks:
            raise ConfigError(f"train.weights.{key}: not a task of this model")
    for key, name in [("train.loss", t.loss)] + [(f"train.losses.{k}", v) for k, v in t.losses.items()]:
        if name not in LOSSES:
            raise ConfigError(f"{key}: unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    for key in t.losses:
        if key not in m.tasks:
            raise ConfigError(f"train.losses.{key}: not a task of this model")
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise ConfigError(f"train.grad_clip: expected > 0 or null, got {t.grad_clip}")
    if t.ema is not None and not 0 < t.ema < 1:
        raise ConfigError(f"train.ema: expected a decay in (0, 1) or null, got {t.ema}")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision: expected auto, fp32 or bf16 (fp16 is not offered: Swin-style "
                          f"attention overflows in it), got {t.precision!r}")
    if t.workers < 0:
        raise ConfigError(f"train.workers: expected >= 0, got {t.workers}")
    if t.threads is not None and t.threads < 1:
        raise ConfigError(f"train.threads: expected >= 1 or null, got {t.threads}")
    for sect, key in ((cfg.checkpoint, "checkpoint.every"), (cfg.val, "val.every"), (cfg.log, "log.every")):
        if sect.every < 1:
            raise ConfigError(f"{key}: expected >= 1, got {sect.every}")
    if cfg.checkpoint.keep < 0:
        raise ConfigError(f"checkpoint.keep: expected >= 0, got {cfg.checkpoint.keep}")
    if cfg.val.task is not None and cfg.val.task not in m.tasks:
        raise ConfigError(f"val.task: {cfg.val.task!r} is not in model.tasks")
    if cfg.init.tasks is not None:
        for i, task in enumerate(cfg.init.tasks):
            if task not in m.tasks:
                raise ConfigError(f"init.tasks[{i}]: {task!r} is not in model.tasks")
        if cfg.init.path is None:
            raise ConfigError("init.tasks: given without init.path")
    if cfg.init.body is not None and cfg.init.path is None:
        raise ConfigError("init.body: given without init.path (which gives the heads and tails)")
    if cfg.init.heads_from and cfg.init.path is None:
        raise ConfigError("init.heads_from: given without init.path")
    for target, src in (cfg.init.heads_from or {}).items():
        where = f"init.heads_from.{target}"
        if target not in m.tasks:
            raise ConfigError(f"{where}: {target!r} is not in model.tasks")
        if cfg.init.tasks is not None and target not in cfg.init.tasks:
            raise ConfigError(f"{where}: {target!r} is not in init.tasks (its head and tail would not be loaded)")
        if src not in TASKS:
            raise ConfigError(f"{where}: unknown task {src!r}; expected one of: {' '.join(TASKS)}")
        if (task_kind(src) == "sr") != (task_kind(target) == "sr"):
            raise ConfigError(f"{where}: {src}'s head and tail do not fit {target} (SR ones start SR tasks; "
                              "denoise and derain ones, with their down-sampling head, start those)")
    return cfg


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def degradation_of(cfg: Config, task: str) -> str:
    d = cfg.data[task].degradation
    if d != "auto":
        return d
    return {"sr": "bicubic", "denoise": "noise", "derain": "rain"}[task_kind(task)]


def noise_sigma_of(cfg: Config, task: str) -> float:
    s = cfg.data[task].noise_sigma
    return float(s) if s is not None else float(task.split("-")[1]) if task_kind(task) == "denoise" else 25.0


def rain_of(cfg: Config, task: str) -> str:
    r = cfg.data[task].rain
    return r if r is not None else ("heavy" if task == "derain-heavy" else "light")


# ------------------------------------------------------------------------------------------------------------
# Loading and overrides
# ------------------------------------------------------------------------------------------------------------

def apply_override(raw: dict, item: str) -> None:
    """``a.b.c=value`` (value parsed as YAML) into the raw mapping, creating sections as needed."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty part in key path {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {text!r} ({e.__class__.__name__})") from None
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: '{'.'.join(parts[:i + 1])}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def config_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    raw = _deepcopy(raw or {})
    for item in overrides:
        apply_override(raw, item)
    if "base" in raw:
        raise ConfigError("base: only a config file can name a base config (it is read by load_config)")
    return _check(_build(Config, raw, ""))


def merge(parent: dict, child: dict) -> dict:
    """``child`` over ``parent``: mappings merge key by key, anything else (lists included) replaces.

    Neither input is changed; values are shared, not copied (``config_from_dict`` copies before it edits)."""
    out = dict(parent)
    for key, value in child.items():
        both_maps = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both_maps else value
    return out


def with_iterations(cfg: Config, iterations: int | None) -> Config:
    """``--iterations N`` over ``train.iterations``: the CLI flag beats the file, as overrides do."""
    if iterations is not None:
        if iterations < 0:
            raise UsageError(f"--iterations must be >= 0, got {iterations}")
        cfg.train.iterations = iterations
    return cfg


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections (model, data, train, ...)")
    return raw or {}


def read_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The raw mapping of a config file with its ``base:`` chain merged in, before overrides and checks.

    ``base: other.yaml`` (relative to this file's folder) makes this file a list of differences from another
    config, so a run that continues a run says only what changed. ``name`` and ``output_dir`` are not inherited:
    without a name a config is named for its file, so it never shares a run folder with its base by accident.
    """
    path = Path(path)
    raw = _read_yaml(path)
    raw.setdefault("name", path.stem)
    if "base" not in raw:
        return raw
    ref = raw.pop("base")
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"{path}: base: expected the path of another config file, got {ref!r}")
    parent = path.parent / ref
    if not parent.is_file():
        raise ConfigError(f"{path}: base: {ref}: no such config file (looked for {parent})")
    chain = (*_chain, path.resolve())
    if parent.resolve() in chain:
        raise ConfigError(f"{path}: base: {ref} leads back to {parent.resolve().name}, a cycle")
    inherited = read_raw(parent, chain)
    inherited.pop("output_dir", None)
    return merge(inherited, raw)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML training config (and its ``base:`` chain), apply ``key.path=value`` overrides, check it all."""
    path = Path(path)
    raw = read_raw(path)
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _deepcopy(x):
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x
