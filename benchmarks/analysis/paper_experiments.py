"""The paper's analysis experiments, at toy scale on the CPU, with ``edtir.analysis``:

* structure  SR vs denoising (vs deraining) representations: self-CKA of the one body of the all-task EDT-T
             (the bundled ``edt-t-multi-291``, or the newest checkpoint of its training run) under each task.
* pretrain   pre-trained vs scratch: EDT-T SR x2 and denoise-25 fine-tuned from the all-task model, and the same
             trained from random weights, for the same few iterations; CKA between the two of each task, PSNR.
* window     EDT's (6, 24) windows vs (8, 8) windows (SwinIR's): both start from the bundled SR x2 model and are
             fine-tuned for the same few iterations; LAM diffusion index on textured windows, CKA, PSNR.

    python benchmarks/analysis/paper_experiments.py                        # all three
    python benchmarks/analysis/paper_experiments.py --only window --iterations 40

Trained models and per-experiment JSON go to runs/analysis/ (reused when present; --retrain to redo), figures
to docs/img/analysis-*.png, the numbers to benchmarks/analysis/results.json (what docs/analysis.md quotes).
Every training run is one ``edtir train`` command, printed as it runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DATA = REPO.parent / "shared" / "data"
IMG = REPO / "docs" / "img"

#: LAM inputs: (image, HR crop x, y, side) made into a 48 x 48 LR input; the window is output pixels 40..56.
LAM_CROPS = [("Set14/zebra.png", 200, 100, 96), ("Set14/barbara.png", 40, 360, 96),
             ("Set14/baboon.png", 300, 40, 96)]
LAM_WINDOW = (40, 40, 16)


def log(msg: str) -> None:
    print(msg, flush=True)


def machine() -> str:
    import os

    return (f"CPU: {os.cpu_count()}-core {platform.machine()} VM, torch {torch.__version__.split('+')[0]} CPU, "
            f"{torch.get_num_threads()} thread(s)")


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

def multi_model_path() -> tuple[Path, str]:
    """The all-task EDT-T: the bundled one when registered, else the newest checkpoint of its training run."""
    from edtir import zoo

    try:
        reg = zoo.registry()
    except Exception:  # a registry being edited: fall back to the run
        reg = {}
    if "edt-t-multi-291" in reg:
        return zoo.HERE / reg["edt-t-multi-291"]["file"], "bundled edt-t-multi-291"
    run = REPO / "runs" / "zoo-t-multi"
    ckpts = sorted(run.glob("checkpoints/step_*/model.safetensors"))
    if (run / "model.safetensors").exists():
        return run / "model.safetensors", "runs/zoo-t-multi/model.safetensors (final)"
    if ckpts:
        step = int(ckpts[-1].parent.name.split("_")[1])
        return ckpts[-1], f"runs/zoo-t-multi checkpoint at step {step}"
    sys.exit("no all-task model: neither edt-t-multi-291 nor a checkpoint in runs/zoo-t-multi")


def train_run(name: str, config: str, overrides: list[str], iterations: int, work: Path, retrain: bool) -> Path:
    out = work / name
    final = out / "model.safetensors"
    if final.exists() and not retrain:
        log(f"[{name}] reusing {final.relative_to(REPO)}")
        return final
    cmd = [sys.executable, "-m", "edtir", "train", str(HERE / config), "--output-dir", str(out),
           "--iterations", str(iterations), "--no-progress", *overrides]
    log(f"[{name}] edtir train {' '.join(cmd[4:])}")
    t = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    log(f"[{name}] {time.time() - t:.0f} s")
    return final


def init_of(run_model: Path) -> str | None:
    """The init.path a (possibly reused) training run started from, as its saved config says."""
    import yaml

    cfg = yaml.safe_load((run_model.parent / "config.yaml").read_text())
    return (cfg.get("init") or {}).get("path")


def load(path: Path, **kw):
    from edtir.models.checkpoint import load_model

    return load_model(path, **kw).eval()


def psnr_of(model, task: str, folder: str, max_images: int | None = None) -> float:
    from edtir.evaluate import evaluate_folder

    return round(float(evaluate_folder(model, task, DATA / folder, progress=False, max_images=max_images)["psnr"]), 3)


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------

def cka(model_a, model_b, task: str, folder: str, batches: int, batch_size: int = 8):
    from edtir.analysis.compare import batched, compare_models, default_crop, input_crops

    crop = default_crop((model_a, model_b), task)
    crops = input_crops(task, DATA / folder, batches * batch_size, crop, seed=0)
    t = time.time()
    r = compare_models(model_a, model_b, task, batched(crops, batch_size), progress=True)
    r.meta.update({"data": folder, "crop": crop, "seconds": round(time.time() - t, 1)})
    return r


def body_summary(r) -> dict:
    """Numbers of a self-CKA matrix: mean CKA between different body layers (how uniform the body is), and
    CKA of the first stage's output with the last stage's and with the body output."""
    names = r.layers_a
    idx = [i for i, n in enumerate(names) if n.startswith("stage") and "." in n]
    sub = r.matrix[np.ix_(idx, idx)]
    off = sub[~np.eye(len(idx), dtype=bool)]
    stages = [n for n in names if n.startswith("stage") and "." not in n]
    at = {n: i for i, n in enumerate(names)}
    return {"mean_body_cka": round(float(off.mean()), 4),
            "stage1_vs_last_stage": round(float(r.matrix[at[stages[0]], at[stages[-1]]]), 4),
            "head_vs_body": round(float(r.matrix[at["head.conv3"], at["body"]]), 4),
            "stage1_vs_tail_last": round(float(r.matrix[at[stages[0]], len(names) - 1]), 4)}


def lam_inputs() -> list[tuple[str, torch.Tensor]]:
    from edtir.analysis.lam import degraded_input
    from edtir.data.io import read_image

    out = []
    for name, x, y, side in LAM_CROPS:
        hr = read_image(DATA / name)[y:y + side, x:x + side]
        lr = degraded_input(hr, "sr-x2")
        out.append((Path(name).stem, torch.from_numpy(lr.transpose(2, 0, 1).copy())[None]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------

def heatmaps_figure(results: list, titles: list[str], path: Path, suptitle: str) -> None:
    from edtir.analysis.plots import new_figure, save_figure, tick_labels

    fig = new_figure(5.2 * len(results) + 1.0, 5.6)
    axes = fig.subplots(1, len(results))
    for ax, r, title in zip(np.atleast_1d(axes), results, titles, strict=True):
        im = ax.imshow(r.matrix, vmin=0, vmax=1, cmap="magma", origin="lower", interpolation="nearest")
        tick_labels(ax, r.layers_b, "x", max_labels=30)
        tick_labels(ax, r.layers_a, "y", max_labels=30)
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.7, label="linear CKA")
    fig.suptitle(suptitle, fontsize=11)
    save_figure(fig, path)
    log(f"wrote {path.relative_to(REPO)}")


def lines_figure(series: dict, path: Path, title: str) -> None:
    from edtir.analysis.plots import new_figure, save_figure, tick_labels

    fig = new_figure(11.0, 4.2)
    ax = fig.subplots()
    columns, low = [], 0.0
    for label, pairs in series.items():
        names, values = zip(*pairs, strict=True)
        columns.append(names)
        low = min(low, min(values) - 0.05)
        ax.plot(range(len(values)), values, marker="o", ms=3, lw=1.2, label=label)
    # The tails differ by task (SR: upsampler, denoise: last conv): such positions show both names.
    names = [" / ".join(dict.fromkeys(col)) for col in zip(*columns, strict=True)]
    tick_labels(ax, names, "x", max_labels=30)
    ax.set_ylim(low, 1.05)
    ax.set_ylabel("CKA of corresponding layers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title(title, fontsize=11)
    save_figure(fig, path)
    log(f"wrote {path.relative_to(REPO)}")


def lam_grid_figure(rows: list[tuple[str, list]], inputs, path: Path) -> None:
    """One row per model, one column per input: attribution over the input, DI in the title."""
    from matplotlib.patches import Rectangle

    from edtir.analysis.plots import attribution_overlay, new_figure, save_figure

    n_r, n_c = len(rows), len(inputs)
    fig = new_figure(3.0 * n_c + 0.6, 3.0 * n_r + 0.4)
    axes = np.array(fig.subplots(n_r, n_c)).reshape(n_r, n_c)
    x, y, size = LAM_WINDOW
    for i, (label, results) in enumerate(rows):
        for j, ((_name, inp), r) in enumerate(zip(inputs, results, strict=True)):
            ax = axes[i, j]
            ax.imshow(np.clip(inp[0].numpy().transpose(1, 2, 0), 0, 1))
            ax.imshow(attribution_overlay(r.attribution))
            ax.add_patch(Rectangle((x / 2 - 0.5, y / 2 - 0.5), size / 2, size / 2, fill=False, ec="cyan", lw=1))
            ax.set_title(f"{label}: DI {r.di:.2f}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("LAM of the cyan window (red: attribution, sqrt scale)", fontsize=10)
    save_figure(fig, path)
    log(f"wrote {path.relative_to(REPO)}")


# ---------------------------------------------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------------------------------------------

def exp_structure(args, work: Path) -> dict:
    path, source = multi_model_path()
    log(f"[structure] all-task model: {source}")
    m = load(path)
    runs = [("sr-x2", "B100"), ("denoise-25", "CBSD68"), ("derain-light", "Rain100L")]
    results, out = [], {"model": source}
    for task, folder in runs:
        r = cka(m, m, task, folder, args.batches)
        results.append(r)
        out[task] = {"data": folder, "crop": r.meta["crop"], "samples": r.samples, "seconds": r.meta["seconds"],
                     **body_summary(r)}
        (work / f"structure-{task}.json").write_text(json.dumps(r.to_json()) + "\n")
        log(f"[structure] {task}: {out[task]}")
    heatmaps_figure(results, [f"{t} ({f})" for t, f in runs], IMG / "analysis-structure.png",
                    f"Self-CKA of one EDT-T body under three tasks ({source})")
    return out


def exp_pretrain(args, work: Path) -> dict:
    path, source = multi_model_path()
    rel = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    out = {"iterations": args.iterations}
    series = {}
    for task, config, folder, psnr_set in (("sr-x2", "sr-x2.yaml", "B100", ("Set5", None)),
                                           ("denoise-25", "denoise-25.yaml", "CBSD68", ("CBSD68", 4))):
        scratch = train_run(f"{task}-scratch", config, [], args.iterations, work, args.retrain)
        pre = train_run(f"{task}-pretrained", config, [f"init.path={rel}", f"init.tasks=[{task}]"],
                        args.iterations, work, args.retrain)
        ms, mp = load(scratch), load(pre)
        log(f"[pretrain] {task}: pre-trained run starts from {init_of(pre)}")
        r = cka(mp, ms, task, folder, args.batches)
        (work / f"pretrain-{task}.json").write_text(json.dumps(r.to_json()) + "\n")
        diag = dict(r.corresponding())
        body = [v for n, v in diag.items() if n.startswith("stage") and "." in n]
        out[task] = {"pretrained_from": init_of(pre), "data": folder, "samples": r.samples,
                     "mean_cka_corresponding": round(float(np.mean(list(diag.values()))), 4),
                     "mean_cka_body_layers": round(float(np.mean(body)), 4),
                     "cka_head_conv3": round(diag["head.conv3"], 4), "cka_body": round(diag["body"], 4),
                     "psnr_set": f"{psnr_set[0]}" + (f" (first {psnr_set[1]})" if psnr_set[1] else ""),
                     "psnr_pretrained": psnr_of(mp, task, psnr_set[0], psnr_set[1]),
                     "psnr_scratch": psnr_of(ms, task, psnr_set[0], psnr_set[1])}
        log(f"[pretrain] {task}: {out[task]}")
        series[task] = r.corresponding()
    lines_figure(series, IMG / "analysis-pretrain-vs-scratch.png",
                 f"Pre-trained vs scratch, EDT-T, {args.iterations} iterations each: CKA of corresponding layers")
    return out


def exp_window(args, work: Path) -> dict:
    from edtir.analysis.lam import lam
    from edtir.baselines import get_baseline
    from edtir.zoo import HERE as ZOO

    init = ZOO / "edt-t-sr-x2-291.safetensors"
    rel = str(init.relative_to(REPO))
    base = [f"init.path={rel}", "init.tasks=[sr-x2]"]
    w624 = train_run("window-6x24", "sr-x2.yaml", base, args.iterations, work, args.retrain)
    w88 = train_run("window-8x8", "sr-x2.yaml", base + ["model.window_size=[8,8]"], args.iterations, work,
                    args.retrain)
    m624, m88 = load(w624), load(w88)
    assert tuple(m88.cfg.window_size) == (8, 8), m88.cfg.window_size
    out = {"init": "bundled edt-t-sr-x2-291", "iterations": args.iterations}
    r = cka(m624, m88, "sr-x2", "B100", args.batches)
    (work / "window-cka.json").write_text(json.dumps(r.to_json()) + "\n")
    out["cka_mean_corresponding"] = round(float(np.mean([v for _, v in r.corresponding()])), 4)
    inputs = lam_inputs()[:args.lam_images]
    rows, di = [], {}
    for label, model in (("bicubic", get_baseline("bicubic", "sr-x2")), ("EDT-T (6,24)", m624),
                         ("EDT-T (8,8)", m88)):
        res = []
        for name, x in inputs:
            t = time.time()
            res.append(lam(model, x, LAM_WINDOW, "sr-x2", batch=5))
            log(f"[window] LAM {label} {name}: DI {res[-1].di:.3f} ({time.time() - t:.0f} s)")
        rows.append((label, res))
        di[label] = {name: round(r_.di, 3) for (name, _), r_ in zip(inputs, res, strict=True)}
        di[label]["mean"] = round(float(np.mean([r_.di for r_ in res])), 3)
    # PSNR last: evaluation runs under inference mode, and LAM needs gradients through the same modules.
    out["psnr_set5"] = {"6x24": psnr_of(m624, "sr-x2", "Set5"), "8x8": psnr_of(m88, "sr-x2", "Set5")}
    out["lam_di"] = di
    out["lam_window"] = {"x": LAM_WINDOW[0], "y": LAM_WINDOW[1], "size": LAM_WINDOW[2],
                         "crops": [list(c) for c in LAM_CROPS[:args.lam_images]]}
    lam_grid_figure(rows, inputs, IMG / "analysis-lam-window.png")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("structure", "pretrain", "window"), action="append",
                   help="run only these experiments (repeat)")
    p.add_argument("--iterations", type=int, default=40, help="training iterations of each toy run (default 40)")
    p.add_argument("--batches", type=int, default=8, help="CKA minibatches of 8 crops (default 8)")
    p.add_argument("--lam-images", type=int, default=3, help="LAM inputs of the window experiment (default 3)")
    p.add_argument("--work", default=str(REPO / "runs" / "analysis"), help="trained models and JSON")
    p.add_argument("--retrain", action="store_true", help="train again even when a run's model exists")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_file = HERE / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name, fn in (("structure", exp_structure), ("pretrain", exp_pretrain), ("window", exp_window)):
        if args.only and name not in args.only:
            continue
        t = time.time()
        results[name] = fn(args, work)
        results[name]["seconds"] = round(time.time() - t)
        results[name]["machine"] = machine()
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        log(f"[{name}] done in {time.time() - t:.0f} s; results in {results_file.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
