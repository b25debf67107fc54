"""Centred kernel alignment (CKA): how alike two sets of representations of the same inputs are.

* :func:`linear_cka` (Kornblith et al., ICML 2019): features are centred column-wise, then
  ``CKA = ||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F)``, the normalised HSIC of linear kernels. It is invariant to
  orthogonal transforms and isotropic scaling of either side, not to general invertible linear maps.
* :func:`rbf_cka`: the same with Gaussian (RBF) kernels, bandwidth a fraction of the median distance.
* :class:`MinibatchCKA` (Nguyen et al., ICLR 2021): for many layers and more samples than fit at once, the
  *unbiased* HSIC estimator of every pair of layers is summed over minibatches, and CKA is formed from the sums at
  the end. Averaging per-batch CKAs instead would keep the small-sample bias of each batch.

Inputs are (n, p) matrices (n samples, p features; more dimensions are flattened per sample), numpy arrays or
torch tensors. Every computation is in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch


def as_matrix(x, device=None) -> torch.Tensor:
    """A numpy array or tensor of shape (n, ...) as a float64 (n, p) tensor (each sample flattened)."""
    t = x.detach() if torch.is_tensor(x) else torch.from_numpy(np.asarray(x, dtype=np.float64))
    t = t.to(device=device if device is not None else t.device, dtype=torch.float64)
    if t.ndim < 2:
        raise ValueError(f"CKA needs a (samples, features) matrix, got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1)


def _pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x = as_matrix(x)
    y = as_matrix(y, device=x.device)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares representations of the same samples: {x.shape[0]} != {y.shape[0]} rows")
    if x.shape[0] < 2:
        raise ValueError("CKA needs at least 2 samples")
    return x, y


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    """num / den; NaN when a side has no variance (den 0), where CKA is undefined."""
    den = float(den)
    return float(num) / den if den > 0 else math.nan


def linear_cka(x, y) -> float:
    """Linear CKA of (n, p1) and (n, p2) features (centred here). Computed in feature space when n >= p, else
    through the n x n Gram matrices (same value, cheaper for wide conv features)."""
    x, y = _pair(x, y)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    if x.shape[0] >= max(x.shape[1], y.shape[1]):
        num = (y.T @ x).square().sum()
        den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    else:
        k, l = x @ x.T, y @ y.T
        num = (k * l).sum()
        den = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l)
    return _ratio(num, den)


def centre_gram(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11ᵀ/n."""
    k = k - k.mean(0, keepdim=True)
    return k - k.mean(1, keepdim=True)


def rbf_gram(x: torch.Tensor, threshold: float = 0.5, sigma: float | None = None) -> torch.Tensor:
    """Gaussian kernel exp(-d² / 2σ²); σ = ``sigma`` or ``threshold`` x the median pairwise distance
    (Kornblith et al.)."""
    sq = x.square().sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    if sigma is None:
        s2 = threshold ** 2 * float(np.median(d2.cpu().numpy()))  # numpy's median (mean of the middle two)
    else:
        s2 = float(sigma) ** 2
    if s2 <= 0:
        raise ValueError("the RBF bandwidth is 0 (all samples equal?): pass sigma=")
    return torch.exp(-d2 / (2.0 * s2))


def rbf_cka(x, y, threshold: float = 0.5, sigma: float | None = None) -> float:
    """CKA with RBF kernels (bandwidth ``threshold`` x median distance, as Kornblith et al., or a fixed
    ``sigma``)."""
    x, y = _pair(x, y)
    k = centre_gram(rbf_gram(x, threshold, sigma))
    l = centre_gram(rbf_gram(y, threshold, sigma))
    return _ratio((k * l).sum(), torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l))


# ---------------------------------------------------------------------------------------------------------------
# Minibatch CKA: unbiased HSIC accumulated over batches
# ---------------------------------------------------------------------------------------------------------------

def linear_gram(x) -> torch.Tensor:
    """X Xᵀ in float64 for one batch of one layer (no centring: the unbiased HSIC does not need it)."""
    x = as_matrix(x)
    return x @ x.T


def _zero_diagonal(k: torch.Tensor) -> torch.Tensor:
    n = k.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs batches of at least 4 samples (got {n})")
    return k.masked_fill(torch.eye(n, dtype=torch.bool, device=k.device), 0.0)


def _unbiased(trace, sums, cross, n: int):
    return (trace + sums / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of Song et al. (2012) for every pair of Gram matrices: ``k`` (a, n, n), ``l`` (b, n, n)
    -> (a, b). With K̃, L̃ the Grams with zeroed diagonals:
    ``[tr(K̃L̃) + 1ᵀK̃1 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) 1ᵀK̃L̃1] / (n(n-3))``. Needs n >= 4."""
    n = k.shape[-1]
    k, l = _zero_diagonal(k), _zero_diagonal(l)
    trace = k.reshape(k.shape[0], -1) @ l.reshape(l.shape[0], -1).T  # tr(K L) = sum(K * L) (symmetric)
    rk, rl = k.sum(-1), l.sum(-1)  # row sums (a, n), (b, n)
    return _unbiased(trace, rk.sum(-1)[:, None] * rl.sum(-1)[None, :], rk @ rl.T, n)


def hsic_unbiased_self(k: torch.Tensor) -> torch.Tensor:
    """HSIC₁(K_i, K_i) for each Gram of (a, n, n) -> (a,): the diagonal of :func:`hsic_unbiased` (k, k)."""
    n = k.shape[-1]
    k = _zero_diagonal(k)
    r = k.sum(-1)
    return _unbiased(k.square().sum((-1, -2)), r.sum(-1).square(), r.square().sum(-1), n)


class MinibatchCKA:
    """CKA between every layer of side A and every layer of side B, accumulated over minibatches.

    Call :meth:`update` once per batch with the batch's features of each layer (or their linear Gram
    matrices, see :meth:`update_grams`); :meth:`result` gives the (layers A, layers B) matrix
    ``Σ HSIC₁(K, L) / sqrt(Σ HSIC₁(K, K) Σ HSIC₁(L, L))``, sums over batches.
    """

    def __init__(self):
        self.xy = self.xx = self.yy = None
        self.batches = 0
        self.samples = 0

    def update(self, xs: Sequence, ys: Sequence | None = None) -> None:
        """``xs``: one (n, ...) feature batch per layer of side A; ``ys`` likewise for side B (None: B = A,
        self-similarity)."""
        ka = torch.stack([linear_gram(x) for x in xs])
        kb = None if ys is None else torch.stack([linear_gram(y).to(ka.device) for y in ys])
        self.update_grams(ka, kb)

    def update_grams(self, ka: torch.Tensor, kb: torch.Tensor | None = None) -> None:
        """Same as :meth:`update` with linear Gram matrices, (layers, n, n) per side."""
        ka = ka.to(torch.float64)
        kb = ka if kb is None else kb.to(device=ka.device, dtype=torch.float64)
        if ka.shape[-1] != kb.shape[-1]:
            raise ValueError(f"both sides must see the same samples ({ka.shape[-1]} != {kb.shape[-1]})")
        xy = hsic_unbiased(ka, kb)
        same = kb is ka
        xx = hsic_unbiased_self(ka)
        yy = xx if same else hsic_unbiased_self(kb)
        if self.xy is None:
            self.xy, self.xx, self.yy = xy, xx, yy
        else:
            if self.xy.shape != xy.shape:
                raise ValueError(f"layer count changed between batches: {tuple(self.xy.shape)} -> {tuple(xy.shape)}")
            self.xy, self.xx, self.yy = self.xy + xy, self.xx + xx, self.yy + yy
        self.batches += 1
        self.samples += ka.shape[-1]

    def result(self) -> np.ndarray:
        if self.xy is None:
            raise ValueError("no batch was added")
        den = torch.sqrt((self.xx[:, None] * self.yy[None, :]).clamp_min(0.0))
        out = self.xy / den
        out[den == 0] = math.nan
        return out.cpu().numpy()


def minibatch_cka(x_batches: Iterable, y_batches: Iterable) -> float:
    """Linear minibatch CKA of one pair of representations given batch by batch (pairs of (n_i, p) batches)."""
    acc = MinibatchCKA()
    for x, y in zip(x_batches, y_batches, strict=True):
        acc.update([x], [y])
    return float(acc.result()[0, 0])
