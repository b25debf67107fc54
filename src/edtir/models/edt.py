"""EDT: the Encoder-Decoder Transformer of Li et al., "On Efficient Transformer and Image Pre-training for
Low-level Vision" (arXiv 2112.10175), in reading order.

    image ─ head (convs, per task) ─ body (shared transformer) ─ tail (convs + upsampler, per task) ─ image

Shapes at the boundaries: images are (B, 3, H, W) in [0, 1]; the body sees (B, C, h, w) feature maps and works on
tokens laid out channel-last as (B, h, w, C). Parameter names and their order equal the official release, so an
official checkpoint loads with ``load_state_dict`` (see ``checkpoint.py`` for the shift-mask buffers it carries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------------------
# Tasks and sizes
# ---------------------------------------------------------------------------------------------------------------

#: edtir task name -> official key suffix. The order is the official order of heads and tails in a state dict.
TASK_KEYS = {
    "sr-x2": "sr_x2",
    "sr-x3": "sr_x3",
    "sr-x4": "sr_x4",
    "denoise-15": "dn_g15",
    "denoise-25": "dn_g25",
    "denoise-50": "dn_g50",
    "derain-light": "dr_L",
    "derain-heavy": "dr_H",
}
TASKS = tuple(TASK_KEYS)
KEY_TASKS = {v: k for k, v in TASK_KEYS.items()}

#: size name -> (num_feat, embed_dim, depths, heads_per_branch, default SR upsampler)
SIZES = {
    "T": (8, 60, (6, 6, 6, 6), 6, "pixelshuffledirect"),
    "S": (16, 120, (6, 6, 6, 6, 6), 6, "pixelshuffle"),
    "B": (32, 180, (6, 6, 6, 6, 6, 6), 6, "pixelshuffle"),
    "L": (64, 240, (6,) * 12, 8, "pixelshuffle"),
}

#: DIV2K RGB mean, subtracted on the way in and added on the way out (image range 1.0). Not in the state dict.
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)


def task_kind(task: str) -> str:
    """'sr', 'denoise' or 'derain'."""
    return task.split("-")[0]


def task_scale(task: str) -> int:
    return int(task[4:]) if task.startswith("sr-x") else 1


def check_task(task: str) -> str:
    if task not in TASK_KEYS:
        raise ValueError(f"unknown task {task!r}; expected one of: {' '.join(TASKS)}")
    return task


@dataclass(frozen=True)
class EDTConfig:
    """Everything that defines an EDT network. ``size`` is informative; the numbers are what count."""

    tasks: tuple[str, ...] = ("sr-x2",)
    num_feat: int = 32
    embed_dim: int = 180
    depths: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    heads: int = 6  # per branch (horizontal and vertical each)
    window_size: tuple[int, int] = (6, 24)  # horizontal window (rows, cols); the vertical one is transposed
    shift_size: tuple[int, int] | None = None  # default: half the window
    mlp_ratio: float = 2.0
    upsampler: str = "pixelshuffle"  # or "pixelshuffledirect" (one conv + shuffle, no last conv)
    downsample: bool = True  # denoise/derain heads go to H/4 (False: the EDT-SF variant)
    drop_path: float = 0.1
    mask_tokens: int = 48  # token grid side the official mask buffers are stored for (48, or 144 for SF)
    size: str | None = "B"

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(check_task(t) for t in self.tasks))
        if not self.tasks:
            raise ValueError("an EDT model needs at least one task")
        order = [t for t in TASKS if t in self.tasks]
        if len(order) != len(self.tasks):
            raise ValueError(f"duplicate tasks in {self.tasks}")
        object.__setattr__(self, "tasks", tuple(order))
        object.__setattr__(self, "window_size", tuple(int(v) for v in self.window_size))
        object.__setattr__(self, "depths", tuple(int(v) for v in self.depths))
        wh, ww = self.window_size
        if self.shift_size is None:
            object.__setattr__(self, "shift_size", (wh // 2, ww // 2))
        object.__setattr__(self, "shift_size", tuple(int(v) for v in self.shift_size))
        if self.upsampler not in ("pixelshuffle", "pixelshuffledirect"):
            raise ValueError(f"unknown upsampler {self.upsampler!r}")
        if self.embed_dim % 2 or (self.embed_dim // 2) % self.heads:
            raise ValueError(f"embed_dim {self.embed_dim} must split into 2 branches of {self.heads} heads")

    @classmethod
    def preset(cls, size: str, tasks=("sr-x2",), **overrides) -> EDTConfig:
        """EDT-T/S/B/L (``size`` 'T', 'S', 'B', 'L', or 'edt-b' style); ``sf=True`` gives EDT-SF."""
        key = size.upper().replace("EDT-", "").replace("EDT", "")
        sf = overrides.pop("sf", False) or key.endswith("SF")
        key = key.removesuffix("SF")
        if key not in SIZES:
            raise ValueError(f"unknown EDT size {size!r}; expected one of T, S, B, L")
        nf, dim, depths, heads, up = SIZES[key]
        base = dict(tasks=tuple(tasks), num_feat=nf, embed_dim=dim, depths=depths, heads=heads, upsampler=up,
                    size=key + ("SF" if sf else ""), downsample=not sf, mask_tokens=144 if sf else 48)
        base.update(overrides)
        return cls(**base)

    @property
    def window_lcm(self) -> int:
        return math.lcm(*self.window_size)

    def size_multiple(self, task: str) -> int:
        """Input sides must be multiples of this: lcm of the window sides, times 4 when the head downsamples."""
        down = task_kind(check_task(task)) != "sr" and self.downsample
        return self.window_lcm * (4 if down else 1)

    def replace(self, **kw) -> EDTConfig:
        return replace(self, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Windows and shift masks
# ---------------------------------------------------------------------------------------------------------------

def window_partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(B, H, W, ...) -> (B * nW, wh * ww, ...), windows in row-major grid order, batch-major."""
    B, H, W = x.shape[:3]
    rest = x.shape[3:]
    x = x.view(B, H // wh, wh, W // ww, ww, *rest)
    x = x.transpose(2, 3)
    return x.reshape(B * (H // wh) * (W // ww), wh * ww, *rest)


def window_reverse(windows: torch.Tensor, wh: int, ww: int, B: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`."""
    rest = windows.shape[2:]
    x = windows.view(B, H // wh, W // ww, wh, ww, *rest)
    return x.transpose(2, 3).reshape(B, H, W, *rest)


def shift_mask(H: int, W: int, window: tuple[int, int], shift: tuple[int, int],
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Swin-style mask (nW, N, N) for a shifted window pass over an H x W token map: 0 within a region,
    -100 between positions that the cyclic shift brought together from different regions."""
    wh, ww = window
    sh, sw = shift
    region = torch.zeros(1, H, W, device=device)
    label = 0
    for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            region[:, hs, ws] = label
            label += 1
    ids = window_partition(region, wh, ww)  # (nW, N)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return diff.ne(0).float() * -100.0


class MaskCache:
    """Shift masks per (H, W, device), computed once and shared by every shifted block of a model.

    Only a few sizes are kept (tiled inference and training reuse one size); masks of other sizes are rebuilt on
    demand, never inside a per-block loop."""

    def __init__(self, window: tuple[int, int], shift: tuple[int, int], keep: int = 4):
        self.window, self.shift, self.keep = window, shift, keep
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, H: int, W: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (H, W, str(device))
        hit = self._cache.pop(key, None)
        if hit is None:
            wh, ww = self.window
            sh, sw = self.shift
            hit = (shift_mask(H, W, (wh, ww), (sh, sw), device), shift_mask(H, W, (ww, wh), (sw, sh), device))
        self._cache[key] = hit  # most recent last
        while len(self._cache) > self.keep:
            self._cache.pop(next(iter(self._cache)))
        return hit


# ---------------------------------------------------------------------------------------------------------------
# Shifted crossed local attention with LePE
# ---------------------------------------------------------------------------------------------------------------

class LePEAttention(nn.Module):
    """Attention of one branch inside (wh x ww) windows. Positions come from LePE: a depthwise 3x3 conv on V,
    applied inside each window (zero padding at window borders) and added to the attention output."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int]):
        super().__init__()
        self.heads, self.window = heads, window
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """qkv: (B, H, W, 3, c) -> (B, H, W, c)."""
        B, H, W, _, c = qkv.shape
        wh, ww = self.window
        n, hd, d = wh * ww, self.heads, self.head_dim
        win = window_partition(qkv, wh, ww)  # (B*nW, N, 3, c)
        win = win.view(-1, n, 3, hd, d).permute(2, 0, 3, 1, 4)  # (3, B*nW, heads, N, d)
        q, k, v = win.unbind(0)
        bw = q.shape[0]
        # LePE on V inside each window; channel index is head * d + j, as in the official layout.
        lepe = self.lepe(v.transpose(-1, -2).reshape(bw, c, wh, ww)).view(bw, hd, d, n).transpose(-1, -2)
        if mask is not None:  # (nW, N, N) -> (B*nW, 1, N, N); 4-D keeps SDPA on its fused kernels
            nw = mask.shape[0]
            mask = mask.to(q.dtype).unsqueeze(0).expand(bw // nw, nw, n, n).reshape(bw, 1, n, n)
        pad = -d % 8 if q.is_cuda else 0
        if pad:  # fused GPU kernels need head_dim % 8 == 0 (EDT has 5, 10, 15): zero columns change nothing
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = (out[..., :d] if pad else out) + lepe
        out = out.transpose(1, 2).reshape(bw, n, c)
        return window_reverse(out, wh, ww, B, H, W)


class AntiBlockingFFN(nn.Module):
    """fc1, GELU, depthwise 5x5 conv over the whole map (mixes across window borders), GELU, fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        x = F.gelu(self.fc1(x))
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(F.gelu(x))


class DropPath(nn.Module):
    """Stochastic depth, drawn per sample."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        m = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * m / keep


class EDTBlock(nn.Module):
    """Pre-norm transformer block: half the channels attend in horizontal windows, half in vertical ones;
    odd blocks shift both. The official mask buffers (``attn_mask_h/v``) are not kept here: masks come from the
    model's :class:`MaskCache` (see ``checkpoint.py`` for reading and writing the official buffers)."""

    def __init__(self, dim, heads, window, shift, mlp_ratio, drop_path, shifted: bool):
        super().__init__()
        wh, ww = window
        self.shifted = shifted
        self.shift_h = tuple(shift) if shifted else (0, 0)
        self.shift_v = (shift[1], shift[0]) if shifted else (0, 0)
        self.norm1 = nn.LayerNorm(dim)
        self.attns = nn.ModuleList([LePEAttention(dim // 2, heads, (wh, ww)),
                                    LePEAttention(dim // 2, heads, (ww, wh))])
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = AntiBlockingFFN(dim, int(dim * mlp_ratio))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path)

    def attention(self, x: torch.Tensor, masks) -> torch.Tensor:
        B, H, W, C = x.shape
        half = C // 2
        qkv = self.qkv(x).view(B, H, W, 3, C)  # [q | k | v]
        outs = []
        for branch, part, shift, mask in ((self.attns[0], qkv[..., :half], self.shift_h, masks[0]),
                                          (self.attns[1], qkv[..., half:], self.shift_v, masks[1])):
            if self.shifted:
                part = torch.roll(part, shifts=(-shift[0], -shift[1]), dims=(1, 2))
                out = branch(part, mask)
                outs.append(torch.roll(out, shifts=shift, dims=(1, 2)))
            else:
                outs.append(branch(part, None))
        return self.proj(torch.cat(outs, dim=-1))

    def forward(self, x: torch.Tensor, masks) -> torch.Tensor:
        """x: (B, H, W, C)."""
        x = x + self.drop_path(self.attention(self.norm1(x), masks))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ResidualGroup(nn.Module):
    def __init__(self, blocks: list[EDTBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, masks):
        for blk in self.blocks:
            x = blk(x, masks)
        return x


class Stage(nn.Module):
    """A group of blocks with a residual around it (no conv inside)."""

    def __init__(self, blocks: list[EDTBlock]):
        super().__init__()
        self.residual_group = ResidualGroup(blocks)

    def forward(self, x, masks):
        return self.residual_group(x, masks) + x


class PatchEmbedNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x)


class Body(nn.Module):
    """The shared transformer: (B, C, h, w) -> (B, C, h, w), with a long skip around it."""

    def __init__(self, cfg: EDTConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbedNorm(dim)
        rates = torch.linspace(0, cfg.drop_path, sum(cfg.depths)).tolist()
        self.layers = nn.ModuleList()
        i = 0
        for depth in cfg.depths:
            blocks = [EDTBlock(dim, cfg.heads, cfg.window_size, cfg.shift_size, cfg.mlp_ratio, rates[i + j],
                               shifted=j % 2 == 1) for j in range(depth)]
            self.layers.append(Stage(blocks))
            i += depth
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = nn.Conv2d(dim, dim, 3, padding=1)
        self.masks = MaskCache(cfg.window_size, cfg.shift_size)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        masks = self.masks(H, W, x.device)
        t = self.patch_embed(x.permute(0, 2, 3, 1))  # (B, H, W, C)
        for stage in self.layers:
            t = stage(t, masks)
        t = self.norm(t).permute(0, 3, 1, 2)
        return self.conv_after_body(t) + x


# ---------------------------------------------------------------------------------------------------------------
# Convolutional heads (encoders) and tails (decoders)
# ---------------------------------------------------------------------------------------------------------------

def lrelu(x):
    return F.leaky_relu(x, 0.2)


class HeadBlock(nn.Module):
    """LReLU(conv_2(LReLU(conv_1(x)))) + shortcut(x), in -> out; optionally a strided conv_down (no bias).
    Returns (features for the next stage, skip for the tail); the skip is taken before conv_down."""

    def __init__(self, cin, cout, down: bool):
        super().__init__()
        self.conv_1 = nn.Conv2d(cin, cin, 3, padding=1)
        self.conv_2 = nn.Conv2d(cin, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1)
        self.conv_down = nn.Conv2d(cout, cout, 4, stride=2, padding=1, bias=False) if down else None

    def forward(self, x):
        skip = lrelu(self.conv_2(lrelu(self.conv_1(x)))) + self.shortcut(x)
        return (self.conv_down(skip) if self.conv_down is not None else skip), skip


class TailResBlock(nn.Module):
    """As in the head but conv_1 changes the width: LReLU(conv_2(LReLU(conv_1(x)))) + shortcut(x)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv_1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv_2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return lrelu(self.conv_2(lrelu(self.conv_1(x)))) + self.shortcut(x)


class TailBlock(nn.Module):
    """Decoder step: conv (same size) or transposed conv (x2 up), concat([decoder, skip]), residual block."""

    def __init__(self, cin, cout, up: bool):
        super().__init__()
        if up:
            self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        else:
            self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.block = TailResBlock(2 * cout, cout)

    def forward(self, x, skip):
        x = self.up(x) if hasattr(self, "up") else self.conv(x)
        return self.block(torch.cat([x, skip], dim=1))


class Head(nn.Sequential):
    """conv 3->nf, block nf->2nf, block 2nf->4nf, conv 4nf->C. Returns (features, [skip 2nf, skip 4nf])."""

    def __init__(self, nf, dim, down: bool):
        super().__init__(nn.Conv2d(3, nf, 3, padding=1), HeadBlock(nf, 2 * nf, down), HeadBlock(2 * nf, 4 * nf, down),
                         nn.Conv2d(4 * nf, dim, 3, padding=1))

    def forward(self, x):
        x = self[0](x)
        x, s1 = self[1](x)
        x, s2 = self[2](x)
        return self[3](x), (s1, s2)


def upsampler(scale: int, cin: int, kind: str) -> nn.Sequential:
    if kind == "pixelshuffledirect":
        return nn.Sequential(nn.Conv2d(cin, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))
    if scale == 3:
        return nn.Sequential(nn.Conv2d(cin, 9 * cin, 3, padding=1), nn.PixelShuffle(3))
    layers = []
    for _ in range(int(math.log2(scale))):
        layers += [nn.Conv2d(cin, 4 * cin, 3, padding=1), nn.PixelShuffle(2)]
    return nn.Sequential(*layers)


class Tail(nn.Sequential):
    """Decoder: two TailBlocks joining the head's skips, then (SR) an upsampler and a last conv, or (DN/DR) the
    last conv. ``forward`` returns the residual to add to the (upscaled) mean-subtracted input."""

    def __init__(self, nf, dim, *, scale: int, up: bool, upsampler_kind: str):
        mods = [TailBlock(dim, 4 * nf, up), TailBlock(4 * nf, 2 * nf, up)]
        if scale > 1:
            mods.append(upsampler(scale, 2 * nf, upsampler_kind))
            if upsampler_kind == "pixelshuffle":
                mods.append(nn.Conv2d(2 * nf, 3, 3, padding=1))
        else:
            mods.append(nn.Conv2d(2 * nf, 3, 3, padding=1))
        super().__init__(*mods)

    def forward(self, x, skips):
        s1, s2 = skips
        x = self[0](x, s2)
        x = self[1](x, s1)
        for m in list(self)[2:]:
            x = m(x)
        return x


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ModelInfo:
    """What a caller needs to know about a model without guessing (in the spirit of spandrel's descriptors)."""

    arch: str
    size: str | None
    tasks: tuple[str, ...]
    scales: dict[str, int]
    size_multiples: dict[str, int]
    params: int
    window_size: tuple[int, int]
    upsampler: str
    downsample: bool
    precisions: tuple[str, ...] = ("fp32", "bf16")
    config: EDTConfig | None = field(default=None, repr=False)

    def describe(self) -> str:
        edt = self.arch == "EDT"
        lines = [f"architecture : {self.arch}" + (f" (EDT-{self.size})" if edt and self.size else ""),
                 f"tasks        : {', '.join(self.tasks)}",
                 "scale        : " + ", ".join(f"{t} x{s}" for t, s in self.scales.items()),
                 "size multiple: " + ", ".join(f"{t} {m}" for t, m in self.size_multiples.items()),
                 f"parameters   : {self.params:,}",
                 f"window       : {self.window_size[0]}x{self.window_size[1]} / "
                 f"{self.window_size[1]}x{self.window_size[0]}" if edt else None,
                 f"upsampler    : {self.upsampler}" if edt and any(s > 1 for s in self.scales.values()) else None,
                 f"variant      : {'EDT' if self.downsample else 'EDT-SF (no down-sampling)'}" if edt else None,
                 f"precisions   : {', '.join(self.precisions)}"]
        return "\n".join(line for line in lines if line)


class EDT(nn.Module):
    """One shared body, one head and one tail per task (attributes ``head_<key>`` / ``tail_<key>`` as in the
    official release: heads first, then the body, then the tails)."""

    def __init__(self, cfg: EDTConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(DIV2K_MEAN).view(1, 3, 1, 1), persistent=False)
        nf, dim = cfg.num_feat, cfg.embed_dim
        for t in cfg.tasks:
            setattr(self, "head_" + TASK_KEYS[t], Head(nf, dim, down=self._down(t)))
        self.body = Body(cfg)
        for t in cfg.tasks:
            setattr(self, "tail_" + TASK_KEYS[t], Tail(nf, dim, scale=task_scale(t), up=self._down(t),
                                                      upsampler_kind=cfg.upsampler))
        self.load_report = None  # filled by edtir.load_model

    def _down(self, task):
        return task_kind(task) != "sr" and self.cfg.downsample

    # -- descriptor ------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[str, ...]:
        return self.cfg.tasks

    def size_multiple(self, task: str | None = None) -> int:
        return self.cfg.size_multiple(self._task(task))

    def scale(self, task: str | None = None) -> int:
        return task_scale(self._task(task))

    @property
    def info(self) -> ModelInfo:
        c = self.cfg
        return ModelInfo(arch="EDT", size=c.size, tasks=c.tasks, scales={t: task_scale(t) for t in c.tasks},
                         size_multiples={t: c.size_multiple(t) for t in c.tasks},
                         params=sum(p.numel() for p in self.parameters()), window_size=c.window_size,
                         upsampler=c.upsampler, downsample=c.downsample, config=c)

    def _task(self, task: str | None) -> str:
        if task is None:
            if len(self.cfg.tasks) != 1:
                raise ValueError(f"this model has several tasks ({', '.join(self.cfg.tasks)}): pass task=...")
            return self.cfg.tasks[0]
        if task not in self.cfg.tasks:
            raise ValueError(f"task {task!r} is not in this model (it has: {', '.join(self.cfg.tasks)})")
        return task

    def _check_input(self, x: torch.Tensor, task: str):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected input of shape (B, 3, H, W), got {tuple(x.shape)}")
        m = self.cfg.size_multiple(task)
        H, W = x.shape[-2:]
        if H % m or W % m:
            raise ValueError(f"{task}: input {H}x{W} is not a multiple of {m}; pad to "
                             f"{-(-H // m) * m}x{-(-W // m) * m} (edtir.inference pads and crops for you)")

    # -- forward ---------------------------------------------------------------------------------------------
    def head(self, task: str, x: torch.Tensor):
        return getattr(self, "head_" + TASK_KEYS[task])(x - self.mean)

    def tail(self, task: str, feats, skips, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self, "tail_" + TASK_KEYS[task])(feats, skips)
        base = x - self.mean
        s = task_scale(task)
        if s > 1:
            base = F.interpolate(base, scale_factor=s, mode="bilinear", align_corners=False)
        return out + base + self.mean

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """x: (B, 3, H, W) in [0, 1] (noisy inputs may leave it) -> (B, 3, sH, sW)."""
        task = self._task(task)
        self._check_input(x, task)
        feats, skips = self.head(task, x)
        return self.tail(task, self.body(feats), skips, x)

    def forward_multi(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Multi-task step of the paper: every task's head output joins one batch through the shared body.
        All heads must give the same token grid (e.g. SR LR 48x48 and DN/DR 192x192)."""
        heads = {}
        for task, x in inputs.items():
            task = self._task(task)
            self._check_input(x, task)
            heads[task] = self.head(task, x)
        grids = {t: tuple(f.shape[-2:]) for t, (f, _) in heads.items()}
        if len(set(grids.values())) != 1:
            raise ValueError(f"multi-task inputs must give one token grid through the heads, got {grids}")
        feats = self.body(torch.cat([f for f, _ in heads.values()], dim=0))
        out, i = {}, 0
        for task, (f, skips) in heads.items():
            n = f.shape[0]
            out[task] = self.tail(task, feats[i:i + n], skips, inputs[task])
            i += n
        return out


def build_model(size: str = "B", tasks=("sr-x2",), **overrides) -> EDT:
    """A fresh EDT: ``build_model('T', ['sr-x2'])``, ``build_model('B', ['denoise-25'], sf=True)``."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    return EDT(EDTConfig.preset(size, tasks=tasks, **overrides))
