"""Named models: bundled weights (``zoo/*.safetensors``, fp16, listed in ``zoo/registry.json``) and the built-in
baselines that need no weights (``bicubic``, ``identity``).

A registry entry says what a user needs to trust a model: its file, tasks, the tasks it is the default for, size,
training recipe (config + command), data, steps, and the PSNR/SSIM measured on each test set with ``edtir eval``.
Adding a model is: put its fp16 file here (``python -m edtir.zoo.bundle``) and add its entry.

``EDTIR_ZOO=/some/folder`` (a folder with a ``registry.json`` and the files it names) replaces the bundled zoo:
a seam for tests and for trying a model before bundling it.

Superseded models are retired to keep the package (and what a GPU lease can carry) small: their entries move to
``retired.json`` with the commit that still holds the file, so their scores and recipes stay on record, configs
that start from them can be rerun after ``git show COMMIT:src/edtir/zoo/FILE > src/edtir/zoo/FILE``, and asking
for one by name says exactly that instead of "unknown model".
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from ..errors import CheckpointError, UsageError

HERE = Path(__file__).parent
ENV = "EDTIR_ZOO"
#: keys every registry entry must have (see docs/restore.md for their meaning)
REQUIRED = ("file", "arch", "params", "tasks", "default_for", "description", "data", "steps", "recipe", "scores")
#: the test sets scored for each kind of task, in the order of the README tables
TEST_SETS = {"sr": ("Set5", "Set14", "B100"), "denoise": ("CBSD68", "Kodak24", "McMaster"),
             "derain-light": ("Rain100L",), "derain-heavy": ("Rain100H",)}


def zoo_dir() -> Path:
    """The zoo folder: ``$EDTIR_ZOO`` when set, else the bundled one."""
    return Path(os.environ.get(ENV) or HERE)


def test_sets(task: str) -> tuple[str, ...]:
    from ..models.edt import task_kind

    return TEST_SETS.get(task) or TEST_SETS[task_kind(task)]


def validate(reg: dict, source: str = "registry.json") -> dict[str, dict]:
    """Check a registry's shape: required keys, known tasks, one default per task. Raises CheckpointError."""
    from ..models.edt import TASKS

    if not isinstance(reg, dict):
        raise CheckpointError(f"{source}: expected an object of name -> entry")
    owner: dict[str, str] = {}
    for name, e in reg.items():
        if not isinstance(e, dict):
            raise CheckpointError(f"{source}: entry {name!r} is not an object")
        missing = [k for k in REQUIRED if k not in e]
        if missing:
            raise CheckpointError(f"{source}: entry {name!r} lacks {', '.join(missing)}")
        bad = [t for t in list(e["tasks"]) + list(e["default_for"]) if t not in TASKS]
        if bad:
            raise CheckpointError(f"{source}: entry {name!r} has unknown task {bad[0]!r}")
        for t in e["default_for"]:
            if t not in e["tasks"]:
                raise CheckpointError(f"{source}: {name!r} is the default for {t!r} but does not do it")
            if t in owner:
                raise CheckpointError(f"{source}: two defaults for {t!r}: {owner[t]!r} and {name!r}")
            owner[t] = name
    return reg


@lru_cache(maxsize=8)
def _read(path: Path, mtime: float) -> dict[str, dict]:
    try:
        reg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the model registry ({e})") from None
    return validate(reg, str(path))


def retired(folder: Path | None = None) -> dict[str, dict]:
    """name -> entry of the models that no longer ship (from ``folder``, default the zoo); each has ``retired``:
    commit, path, replaced_by, date."""
    f = (folder or zoo_dir()) / "retired.json"
    if not f.exists():
        return {}
    try:
        reg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot read the retired models ({e})") from None
    if not isinstance(reg, dict):
        raise CheckpointError(f"{f}: expected an object of name -> entry")
    bad = [n for n, e in reg.items() if not isinstance(e, dict) or "file" not in e
           or not {"commit", "path", "replaced_by"} <= set(e.get("retired", {}))]
    if bad:
        raise CheckpointError(f"{f}: entry {bad[0]!r} lacks its file or its retired commit, path, replaced_by")
    return reg


def restore_command(entry: dict) -> str:
    """The shell command, run in the repository, that puts a retired model's file back where it was."""
    r = entry["retired"]
    return f"git show {r['commit'][:12]}:{r['path']} > {r['path']}"


def retired_hint(path_or_name: str | os.PathLike) -> str:
    """For a missing file or an unknown name: how to get a retired model back ('' when it is not one)."""
    key = Path(path_or_name).name
    for name, e in retired().items():
        if key in (name, e["file"]):
            return (f"; {name} was retired (superseded by {e['retired']['replaced_by']}), restore its file from "
                    f"the repository's history with: {restore_command(e)}")
    return ""


def registry(folder: Path | None = None) -> dict[str, dict]:
    """name -> entry for every bundled model (or those of ``$EDTIR_ZOO``, or of ``folder``); {} when there is no
    registry."""
    f = (folder or zoo_dir()) / "registry.json"
    if not f.exists():
        return {}
    return {k: dict(v) for k, v in _read(f, f.stat().st_mtime).items()}


def names() -> list[str]:
    from ..baselines import BASELINES

    return sorted(registry()) + sorted(BASELINES)


def defaults() -> dict[str, str]:
    """task -> the name of its default bundled model, in task order."""
    from ..models.edt import TASKS

    d = {t: name for name, e in registry().items() for t in e["default_for"]}
    return {t: d[t] for t in TASKS if t in d}


def default_for(task: str) -> str:
    """The default bundled model of ``task``; UsageError naming the tasks that have one when it has none."""
    from ..models.edt import TASKS

    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; expected one of: {' '.join(TASKS)}")
    d = defaults()
    if task not in d:
        have = ", ".join(t for t in TASKS if t in d) or "none"
        raise UsageError(f"no bundled model does {task!r} yet (tasks with a default model: {have}); "
                         "give --model NAME or --weights FILE")
    return d[task]


def path_of(name: str) -> Path:
    return zoo_dir() / registry()[name]["file"]


def default_model() -> str | None:
    """The default model of the first task that has one (TASKS order), or None for an empty zoo."""
    return next(iter(defaults().values()), None)


def get_model(model: str | None = None, weights: str | None = None, task: str | None = None, device="cpu"):
    """Resolve ``--model NAME`` (bundled, a baseline, or ``default``), ``--weights FILE``, or nothing (the
    default bundled model of ``task``) into a model in eval mode. Bundled fp16 weights load as fp32."""
    from ..baselines import BASELINES, get_baseline
    from ..models.checkpoint import load_model

    if weights is not None:
        return load_model(weights, device=device)
    if model is None or model == "default":
        if task is None:
            raise UsageError("name a task (--task) to use its default model, or give --model NAME / "
                             "--weights FILE")
        model = default_for(task)
    if model in BASELINES:
        return get_baseline(model, task).to(device)
    reg = registry()
    if model in reg:
        m = load_model(path_of(model), device=device)
        m.zoo_name = model
        return m
    gone = retired()
    if model in gone:
        raise UsageError(f"model {model!r} no longer ships{retired_hint(model)}, then use --weights "
                         f"{gone[model]['retired']['path']}")
    raise UsageError(f"unknown model {model!r}; available: {', '.join(names())}, default (or --weights FILE)")
