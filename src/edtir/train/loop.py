"""The training loop: single-task and multi-task pre-training and fine-tuning, in one readable function.

One step = one batch per task; every task's head output goes through the shared body in one pass
(``EDT.forward_multi``), one pixel loss per task (L1 unless ``train.loss``/``train.losses`` say L2), summed with
the configured weights; Adam and a MultiStepLR
(fine-tuning: no milestones, so a constant LR); bf16 autocast on the GPU; optional gradient clipping and EMA.

Exact resume: the data of a step is a pure function of (seed, step, rank) (``edtir.data.datasets``), torch's
RNG is reseeded per step for drop path (``state.step_seed``), and model, optimizer, scheduler, EMA and RNGs
are restored from the newest complete checkpoint, so a killed and resumed run ends with the same bits as an
uninterrupted one (on the same machine, thread count and world size).

Failures never cost the last good checkpoint: a non-finite loss (or weights) stops the run before anything
is written from it (:class:`~edtir.errors.TrainingStopped`); the first SIGINT/SIGTERM finishes the current
step, saves a checkpoint and exits (:class:`~edtir.errors.Interrupted`, see ``train.signals``); ``--resume``
skips damaged checkpoints (``state.load_latest``)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.io import atomic_write_bytes, ensure_writable_dir
from ..errors import CheckpointError, Interrupted, TrainingStopped, UsageError
from ..models.edt import EDT, build_model
from . import distributed, state
from .config import Config, dump_config, with_iterations
from .signals import StopRequest

log = logging.getLogger(__name__)

#: Under CUDA or torchrun, how often (in steps, besides log, validation and checkpoint steps) the loss check
#: and a stop request cost a device sync / a collective; a single CPU process checks every step.
SYNC_EVERY = 10


class MultiTaskStep(nn.Module):
    """``{task: inputs} -> {task: outputs}`` through ``forward_multi``, as a forward (what DDP hooks)."""

    def __init__(self, model: EDT):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model.forward_multi(inputs)


def make_model(cfg: Config) -> EDT:
    m = cfg.model
    overrides = dict(window_size=tuple(m.window_size), drop_path=m.drop_path, sf=m.sf)
    if m.upsampler is not None:
        overrides["upsampler"] = m.upsampler
    return build_model(m.size, m.tasks, **overrides)


PIXEL_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}  # the names of ``edtir.train.config.LOSSES``


def pixel_loss(name: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return PIXEL_LOSSES[name](output, target)  # an unchecked name is a KeyError, never a silent L2


def train_step(step_module, batch, optimizer, weights: dict[str, float], device: torch.device, bf16: bool,
               grad_clip: float | None, params, losses_by_task: dict[str, str] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step on ``{task: (inputs, targets)}``; returns (total loss, loss per task), detached
    tensors (no GPU sync here: ``.item()`` them only when logging)."""
    inputs = {t: x.to(device, non_blocking=True) for t, (x, _) in batch.items()}
    targets = {t: y.to(device, non_blocking=True) for t, (_, y) in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        outputs = step_module(inputs)
    kinds = losses_by_task or {}
    losses = {t: pixel_loss(kinds.get(t, "l1"), outputs[t].float(), targets[t]) for t in targets}
    loss = sum(weights[t] * losses[t] for t in losses)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.detach(), {t: v.detach() for t, v in losses.items()}


def validate(model: EDT, cfg: Config, device: torch.device) -> dict[str, float]:
    """PSNR/SSIM of ``model`` on the validation folder, by the evaluation protocol of the task (the one place
    training calls the eval pipeline)."""
    from ..evaluate import evaluate_folder

    task = cfg.val.task or cfg.model.tasks[0]
    was = model.training
    model.eval()
    try:
        result = evaluate_folder(model, task, cfg.val.folder, max_images=cfg.val.max_images, device=device,
                                 progress=False)
    finally:
        model.train(was)
    return {k: float(result[k]) for k in ("psnr", "ssim")}


class Monitor:
    """Rank 0's outputs: progress bar, JSONL log, TensorBoard (when installed), one-line messages."""

    def __init__(self, out: Path, cfg: Config, start: int, enabled: bool, progress: bool):
        from tqdm import tqdm

        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = tqdm(total=cfg.train.iterations, initial=start, disable=not (enabled and progress),
                        unit="it", dynamic_ncols=True, file=sys.stderr)
        if not enabled:
            return
        path = out / "log.jsonl"
        if path.exists():  # resuming: drop what the killed run logged after its last checkpoint
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and _step_of(ln) <= start]
            text = "".join(ln + "\n" for ln in keep)
            atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))
        self.jsonl = open(path, "a")  # noqa: SIM115 - kept open for the run
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)
            except ImportError:
                self.say("tensorboard is not installed: logging to log.jsonl only")

    def say(self, msg: str) -> None:
        if self.enabled:
            self.bar.write(msg, file=sys.stderr)
            log.info(msg)

    def record(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62


def train(cfg: Config, output_dir: str | Path | None = None, *, resume: bool = False,
          iterations: int | None = None, progress: bool = True) -> Path:
    """Train as ``cfg`` says; returns the path of the final weights (``<output>/model.safetensors``)."""
    with_iterations(cfg, iterations)
    out = Path(output_dir or cfg.output_dir or Path("runs") / cfg.name)
    for key, path in (("init.path", cfg.init.path), ("init.body", cfg.init.body)):
        if path and not resume and not Path(path).is_file():  # a resumed run starts from its checkpoint
            from ..zoo import retired_hint

            raise UsageError(f"{key}: {path} is not a file{retired_hint(path)}")
    if distributed.env_ranks()[0] == 0:
        ensure_writable_dir(out)  # a clear error before any work
    info = distributed.setup(cfg.train.device)
    try:
        with StopRequest() as stop:
            return _train(cfg, out, info, resume, progress, stop)
    finally:
        distributed.teardown(info)


def _note_nonfinite(record: torch.Tensor, loss: torch.Tensor, step: int) -> None:
    """Keep (first step with a non-finite loss, that loss) in ``record``, on the device: no sync per step."""
    first = (record[0] == 0) & ~torch.isfinite(loss)
    record[0] = torch.where(first, float(step), record[0])
    record[1] = torch.where(first, loss.double(), record[1])


def _agree(record: torch.Tensor, signum: int | None, step: int, info: distributed.DistInfo
           ) -> tuple[int, float, int]:
    """(first step with a non-finite loss or 0, that loss, a stop signal or 0), the same on every rank."""
    bad_step, bad_loss = int(record[0].item()), float(record[1].item())
    if not info.enabled:
        return bad_step, bad_loss, signum or 0
    import torch.distributed as dist

    flags = torch.tensor([float(bad_step > 0), float(signum or 0)], dtype=torch.float64, device=info.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # one rank's nan or signal stops them all at this step
    return (bad_step or (step if flags[0] else 0)), bad_loss, int(flags[1].item())


def _all_finite(*modules) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules if m is not None for p in m.parameters())


def _train(cfg: Config, out: Path, info: distributed.DistInfo, resume: bool, progress: bool,
           stop: StopRequest) -> Path:
    from ..data.datasets import TrainPatches, build_sources, make_loader
    from ..models.checkpoint import load_partial

    t, dev = cfg.train, info.device
    if t.threads:
        torch.set_num_threads(t.threads)
    if not resume and (state.list_checkpoints(out) or (out / "model.safetensors").exists()):
        raise UsageError(f"{out} holds an earlier run: pass --resume to continue it, or choose another "
                         "--output-dir")
    if cfg.val.folder and not Path(cfg.val.folder).is_dir():
        raise UsageError(f"val.folder: {cfg.val.folder} is not a folder")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        state.sweep_partial(out)

    # Model, optimizer, schedule. The same seed gives every rank the same initial weights.
    torch.manual_seed(t.seed)
    model = make_model(cfg).to(dev)
    found = state.load_latest(out) if resume else None
    if resume and found is None and any(state.checkpoints_dir(out).glob("step_*")):
        raise CheckpointError(f"{state.checkpoints_dir(out)}: every checkpoint is damaged (see the warnings); "
                              "move them away to start again from step 0")
    init_report = None
    if found is None and cfg.init.path:
        init_report = load_partial(model, cfg.init.path, cfg.init.tasks, cfg.init.heads_from)
        if cfg.init.body:  # the heads and tails stay path's
            load_partial(model, cfg.init.body, [])
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=t.milestones, gamma=t.gamma)
    ema = state.EMA(model, t.ema) if t.ema else None
    start, best, schedule_note = 0, None, None
    if found is not None:
        folder, saved = found
        state.restore(saved, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, rank=info.rank,
                      world=info.world_size)
        start, best = saved["step"], saved.get("best")
        schedule_note = state.apply_schedule(scheduler, lr=t.lr, milestones=t.milestones, gamma=t.gamma)
    step_module = distributed.wrap(MultiTaskStep(model), info)

    # Data: step s on rank r reads global samples (s * world + r) * batch + i, i < batch.
    dataset = TrainPatches(build_sources(cfg), seed=t.seed, cache_mb=t.image_cache_mb)
    loader = make_loader(dataset, start=start, stop=t.iterations, batch=t.batch, rank=info.rank,
                         world=info.world_size, workers=t.workers, pin_memory=dev.type == "cuda")
    bf16 = t.precision == "bf16" or (t.precision == "auto" and dev.type == "cuda")
    weights = {task: float(t.weights.get(task, 1.0)) for task in cfg.model.tasks}
    loss_kinds = {task: t.losses.get(task, t.loss) for task in cfg.model.tasks}

    out_model = lambda: ema.module if ema is not None else model  # noqa: E731 - the weights we publish
    mon = Monitor(out, cfg, start, info.is_main, progress)
    try:
        if info.is_main:
            text = dump_config(cfg)
            atomic_write_bytes(out / "config.yaml", lambda tmp: Path(tmp).write_text(text))
            n_params = sum(p.numel() for p in params)
            mon.say(f"EDT-{model.cfg.size} {'+'.join(model.tasks)}: {n_params:,} parameters, "
                    f"{info.world_size} process(es) on {dev.type}, {'bf16' if bf16 else 'fp32'}, batch {t.batch} "
                    f"per task per process, {t.iterations} iterations -> {out}")
            for src in dataset.sources:
                mon.say(f"  {src.task}: {len(src.images)} images ({src.degradation}) + {len(src.pairs)} pairs, "
                        f"patch {src.patch}")
            if found is not None:
                mon.say(f"resumed from {found[0]} (step {start})")
                if schedule_note:
                    mon.say(schedule_note)
            elif resume:
                mon.say(f"--resume: no complete checkpoint in {out}; starting from step 0")
            if init_report is not None:
                mon.say(f"init from {cfg.init.path}: kept {len(init_report.kept)} tensors (body + "
                        f"{', '.join(cfg.init.tasks or model.tasks)}); dropped {len(init_report.dropped)} "
                        f"({', '.join(sorted({k.split('.')[0] for k in init_report.dropped})) or 'none'}); "
                        f"{len(init_report.mismatched)} of another shape and {len(init_report.missing)} missing "
                        f"left as initialised" + (f"; then the body from {cfg.init.body}" if cfg.init.body else "")
                        + "".join(f"; {t} from the file's {s}" for t, s in (cfg.init.heads_from or {}).items()))

        model.train()
        t0, last_step = time.perf_counter(), start
        step = start
        saved = (found[0], start) if found is not None else None  # the newest good checkpoint: (folder, step)
        record = torch.zeros(2, dtype=torch.float64, device=dev)  # first step with a non-finite loss, its loss
        every_step = not info.enabled and dev.type == "cpu"

        def stopped(why: str, at: int) -> TrainingStopped:
            keep = (f"the last good checkpoint is {saved[0]} (step {saved[1]}): resume from it with --resume"
                    if saved else "no checkpoint was written before it: start again")
            return TrainingStopped(f"{why} at step {at}: training stopped, nothing written from it; {keep}, after "
                                   "lowering train.lr or setting train.grad_clip")

        def checkpoint(step: int) -> None:
            nonlocal saved
            if not _all_finite(model, ema.module if ema is not None else None):
                raise stopped("the weights became nan/inf (the loss was still finite)", step)
            rngs = distributed.gather_objects(state.rng_state(), info)
            folder = None
            if info.is_main:
                folder = state.save_checkpoint(out, step, model=model, out_model=out_model(), optimizer=optimizer,
                                               scheduler=scheduler, ema=ema, rng=rngs, best=best,
                                               keep=cfg.checkpoint.keep)
            saved = (folder, step)

        stop.arm()  # from here a first SIGINT/SIGTERM ends the step, saves and stops
        for step, batch in enumerate(loader, start=start + 1):
            torch.manual_seed(state.step_seed(t.seed, step, info.rank))  # drop path: a function of the step
            loss, losses = train_step(step_module, batch, optimizer, weights, dev, bf16, t.grad_clip, params,
                                      loss_kinds)
            scheduler.step()
            if ema is not None:
                ema.update(model, step if t.ema_warmup else None)
            mon.bar.update(1)
            _note_nonfinite(record, loss, step)

            log_now = step % cfg.log.every == 0 or step == t.iterations
            val_now = bool(cfg.val.folder) and step % cfg.val.every == 0
            ckpt_now = step % cfg.checkpoint.every == 0 or step == t.iterations
            signum = 0 if info.enabled else (stop.signum or 0)
            if every_step or log_now or val_now or ckpt_now or step % SYNC_EVERY == 0:
                bad_step, bad_loss, signum = _agree(record, stop.signum, step, info)
                if bad_step:
                    raise stopped(f"the loss is {bad_loss}", bad_step)

            if log_now:
                vals = {"loss": loss.item(), **{f"loss/{k}": v.item() for k, v in losses.items()}}
                vals = distributed.mean_across(vals, info)
                dt = time.perf_counter() - t0
                speed = (step - last_step) / dt if dt > 0 else 0.0
                t0, last_step = time.perf_counter(), step
                mon.bar.set_postfix(loss=f"{vals['loss']:.4f}")
                mon.record(step, {**vals, "lr": optimizer.param_groups[0]["lr"], "it_per_s": round(speed, 4),
                                  "patches_per_s": round(speed * t.batch * len(weights) * info.world_size, 2)})

            if val_now and info.is_main:
                scores = validate(out_model(), cfg, dev)
                mon.record(step, {f"val/{k}": v for k, v in scores.items()})
                mon.say(f"step {step}: validation " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                if "psnr" in scores and (best is None or scores["psnr"] > best["psnr"]):
                    if not _all_finite(out_model()):
                        raise stopped("the weights became nan/inf (the loss was still finite)", step)
                    best = {"step": step, **scores}
                    state.save_weights(out_model(), out / "best.safetensors",
                                       metadata={"step": step, "val": scores})

            if ckpt_now or (signum and (saved is None or saved[1] != step)):
                checkpoint(step)
            if signum:
                name = signal.Signals(signum).name
                raise Interrupted(f"{name}: stopped after step {step}, checkpoint saved in {saved[0] or out}; "
                                  "continue with --resume", signum)

        final = out / "model.safetensors"
        if info.is_main:
            if not _all_finite(out_model()):
                raise stopped("the weights became nan/inf", step)
            state.save_weights(out_model(), final, metadata={"step": max(step, start), "ema": ema is not None})
            note = f" (best val PSNR {best['psnr']:.4f} at step {best['step']})" if best else ""
            mon.say(f"done: {final}{note}")
    finally:
        mon.close()
    distributed.barrier(info)
    return final
