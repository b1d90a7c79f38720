"""Negative-binomial head on frozen image features (STImage, DESIGN §4), and NB distribution maths."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from ._constants import NB_KEYS


def nb_log_prob(y: torch.Tensor, r: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Log NB(y; r, p) with p = sigmoid(logits) the success probability; mean r(1−p)/p = r·exp(−logits)."""
    return (torch.lgamma(y + r) - torch.lgamma(r) - torch.lgamma(y + 1.0)
            - r * F.softplus(-logits) - y * F.softplus(logits))


class NBModule(BaseModuleClass):
    """MLP from (standardised) features to per-gene NB parameters r = softplus(·), p = sigmoid(·).

    With a library-size offset ``o = log l − log l_ref`` the success logit becomes ``logit − o``,
    which multiplies the NB mean ``r(1−p)/p`` by ``l / l_ref`` and keeps ``r`` fixed.

    Parameters
    ----------
    n_input
        Feature width.
    n_genes
        Number of target genes.
    n_hidden
        Hidden width; ``0`` gives a linear head.
    n_layers
        Hidden layers.
    dropout
        Dropout on the hidden layers (and, at 1/2 of it, on the input).
    use_library
        Add the library-size offset.
    feature_mean, feature_std
        Standardisation of the input features (buffers, saved with the model).
    gene_mean
        Mean count per gene (initialises the output bias so training starts at the gene means).
    log_library_ref
        Reference log library size (offset 0).
    """

    def __init__(self, n_input: int, n_genes: int, *, n_hidden: int = 256, n_layers: int = 1,
                 dropout: float = 0.1, use_library: bool = False,
                 feature_mean: np.ndarray | None = None, feature_std: np.ndarray | None = None,
                 gene_mean: np.ndarray | None = None, log_library_ref: float = 0.0, r_init: float = 2.0):
        super().__init__()
        self.n_genes, self.use_library = int(n_genes), bool(use_library)
        fm = torch.zeros(n_input) if feature_mean is None else torch.as_tensor(feature_mean, dtype=torch.float32)
        fs = torch.ones(n_input) if feature_std is None else torch.as_tensor(feature_std, dtype=torch.float32)
        self.register_buffer("feature_mean", fm)
        self.register_buffer("feature_std", fs.clamp_min(1e-6))
        self.register_buffer("log_library_ref", torch.tensor(float(log_library_ref)))
        layers: list[nn.Module] = [nn.Dropout(dropout / 2)] if dropout > 0 else []
        d = n_input
        for _ in range(n_layers if n_hidden > 0 else 0):
            layers += [nn.Linear(d, n_hidden), nn.LayerNorm(n_hidden), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = n_hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, 2 * self.n_genes)
        with torch.no_grad():  # start at r = r_init and mean = gene mean
            self.head.weight.mul_(0.1)
            gm = torch.full((self.n_genes,), 1.0) if gene_mean is None else torch.as_tensor(gene_mean, dtype=torch.float32)
            r0 = math.log(math.expm1(r_init))
            self.head.bias[: self.n_genes] = r0
            self.head.bias[self.n_genes:] = math.log(r_init) - torch.log(gm.clamp_min(1e-3))

    def _get_inference_input(self, tensors):
        out = {"emb": tensors[NB_KEYS.EMB]}
        if self.use_library:
            out["log_library"] = tensors[NB_KEYS.LOG_LIB]
        return out

    def _get_generative_input(self, tensors, inference_outputs):
        return {}

    @auto_move_data
    def inference(self, emb: torch.Tensor, log_library: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """NB parameters ``r`` and success ``logits`` per spot and gene."""
        if not isinstance(emb, torch.Tensor):  # ndarray subclasses (anndata's ArrayView) skip torch's collation
            emb = torch.as_tensor(np.asarray(emb), device=self.feature_mean.device)
        h = self.body((emb.float() - self.feature_mean) / self.feature_std)
        a, b = self.head(h).split(self.n_genes, dim=-1)
        r = F.softplus(a) + 1e-4
        if self.use_library and log_library is not None:
            b = b - (log_library.reshape(-1, 1).float() - self.log_library_ref)
        return {"r": r, "logits": b}

    def generative(self) -> dict:
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        """NB negative log-likelihood summed over genes, averaged over spots."""
        y = tensors[NB_KEYS.COUNTS].float()
        nll = -nb_log_prob(y, inference_outputs["r"], inference_outputs["logits"]).sum(-1)
        return LossOutput(loss=nll.mean(), reconstruction_loss=nll)

    def sample(self, *args, **kwargs):
        msg = "Use NBRegressor.get_mean_variance or predict; sampling counts is not implemented."
        raise NotImplementedError(msg)


def nb_mean_var(r: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean r(1−p)/p and variance r(1−p)/p² for p = sigmoid(logits)."""
    mean = r * torch.exp(-logits)
    return mean, mean * (1.0 + torch.exp(-logits))  # (1−p)/p² = e^{−b}(1+e^{−b})


def _nodes(kmax: float, n_exact: int, n_log: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer support nodes and log quadrature weights.

    Every count below ``n_exact``, then ``n_log`` log-spaced counts up to ``kmax`` weighted by the
    gap they stand for (trapezoid rule).
    """
    if kmax <= n_exact:  # every count 0 … ceil(kmax) (which may be n_exact itself), unit weights
        n = max(2, math.ceil(kmax) + 1)
        return torch.arange(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    exact = torch.arange(n_exact, dtype=torch.float64)
    tail = torch.unique(torch.round(torch.logspace(math.log10(n_exact), math.log10(kmax), n_log, dtype=torch.float64)))
    y = torch.cat([exact, tail[tail >= n_exact]])
    w = torch.ones_like(y)
    gaps = y[1:] - y[:-1]
    w[n_exact:] = 0.5 * (gaps[n_exact - 1:] + torch.cat([gaps[n_exact:], gaps[-1:]]))
    return y, torch.log(w)


def _weighted_logpmf(y, lw, r, b):
    """log(weight · pmf) on the nodes, normalised over the support; r, b: (..., 1)."""
    lp = torch.lgamma(y + r) - torch.lgamma(r) - torch.lgamma(y + 1) - r * F.softplus(-b) - y * F.softplus(b) + lw
    return torch.log_softmax(lp, dim=-1)


def _gene_blocks(kmax: torch.Tensor, step: int):
    """Genes in blocks of similar support size (small supports for lowly expressed genes)."""
    order = torch.argsort(kmax)
    for s in range(0, len(order), step):
        cols = order[s:s + step]
        yield cols, float(kmax[cols].max())


def nb_log1p_moments(r: np.ndarray, logits: np.ndarray, *, n_sd: float = 10.0, n_exact: int = 64,
                     n_log: int = 192, block_elems: int = 2**22, min_support: float = 0.0,
                     block_genes: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """E[log1p Y] and Var[log1p Y] for Y ~ NB(r, p) by numerical summation of the pmf.

    The support of each block of genes runs to ``max(mean + n_sd·sd, min_support)`` (the pmf is
    renormalised over it): exact summation over counts below ``n_exact`` and a trapezoid rule on
    ``n_log`` log-spaced counts above (relative spacing ≤ 3 % for supports up to 10⁴, far below
    the NB's spread at such counts). :func:`nb_log1p_moments_fast` interpolates a table of this
    sum and is what predictions use.
    """
    r_t = torch.as_tensor(r, dtype=torch.float64)
    b_t = torch.as_tensor(logits, dtype=torch.float64)
    n, g = r_t.shape
    mean, var = nb_mean_var(r_t, b_t)
    m1 = torch.empty(n, g, dtype=torch.float64)
    m2 = torch.empty(n, g, dtype=torch.float64)
    for cols, kmax in _gene_blocks((mean + n_sd * var.sqrt()).amax(0).clamp_min(min_support), block_genes):
        y, lw = _nodes(kmax, n_exact, n_log)
        ly = torch.log1p(y)
        rows = max(1, block_elems // (len(cols) * len(y)))
        for i in range(0, n, rows):
            w = _weighted_logpmf(y, lw, r_t[i:i + rows, cols].unsqueeze(-1), b_t[i:i + rows, cols].unsqueeze(-1)).exp()
            m1[i:i + rows, cols] = (w * ly).sum(-1)
            m2[i:i + rows, cols] = (w * ly * ly).sum(-1)
    v = (m2 - m1**2).clamp_min(0.0)
    return m1.numpy(), v.numpy()


def nb_mixture_quantiles(r: np.ndarray, logits: np.ndarray, qs: tuple[float, ...], *, n_sd: float = 10.0,
                         n_exact: int = 64, n_log: int = 192, block_elems: int = 2**22) -> list[np.ndarray]:
    """Quantiles of the equal-weight mixture of M NB distributions.

    ``r``, ``logits``: ``(M, n, g)``. ``qs``: levels, each a float or a ``(g,)`` array (one level per
    gene, e.g. conformally calibrated). Returns one ``(n, g)`` array per level: the smallest count
    whose mixture CDF reaches it (exact below ``n_exact``; on the log grid above).
    """
    r_t = torch.as_tensor(r, dtype=torch.float64)
    b_t = torch.as_tensor(logits, dtype=torch.float64)
    M, n, g = r_t.shape
    mean, var = nb_mean_var(r_t, b_t)
    outs = [torch.empty(n, g, dtype=torch.float64) for _ in qs]
    q_t = [torch.as_tensor(np.asarray(q, dtype=np.float64)) for q in qs]
    for q in q_t:
        if q.ndim not in (0, 1) or (q.ndim == 1 and q.shape[0] != g):
            msg = f"each level must be a float or one level per gene ({g}), got shape {tuple(q.shape)}."
            raise ValueError(msg)
    for cols, kmax in _gene_blocks((mean + n_sd * var.sqrt()).amax((0, 1)), 16):
        y, lw = _nodes(kmax, n_exact, n_log)
        rows = max(1, block_elems // (M * len(cols) * len(y)))
        for i in range(0, n, rows):
            lp = _weighted_logpmf(y, lw, r_t[:, i:i + rows][:, :, cols].unsqueeze(-1),
                                  b_t[:, i:i + rows][:, :, cols].unsqueeze(-1))
            cdf = lp.exp().mean(0).cumsum(-1)
            for o, q in zip(outs, q_t, strict=True):
                qc = q if q.ndim == 0 else q[cols].unsqueeze(-1)
                k = (cdf < qc - 1e-12).sum(-1).clamp_max(len(y) - 1)
                o[i:i + rows, cols] = y[k]
    return [o.numpy() for o in outs]


# --------------------------------------------------------------------------- fast log1p moments
#: The (log r, log mean) grid of the shipped table of log E[log1p Y] and log Var[log1p Y].
LOG1P_TABLE_GRID = {"log_r": (math.log(1e-4), math.log(1e4)), "log_mean": (math.log(1e-5), math.log(1e5)), "step": 0.05}
_TABLE: dict[str, np.ndarray] = {}


def build_log1p_table() -> dict[str, np.ndarray]:
    """Compute the table of :func:`nb_log1p_moments_fast` (≈ 3 s on one CPU thread; once per process).

    Every grid point is summed with a wide support (mean + 40 sd, at least the 64 exact counts), so
    the table is more accurate than the default ``nb_log1p_moments`` (10 sd, which truncates the
    heavy tail of very over-dispersed NBs).
    """
    g = LOG1P_TABLE_GRID
    lr = np.arange(g["log_r"][0], g["log_r"][1] + 1e-9, g["step"])
    lm = np.arange(g["log_mean"][0], g["log_mean"][1] + 1e-9, g["step"])
    R = np.repeat(np.exp(lr)[:, None], len(lm), 1)
    M = np.repeat(np.exp(lm)[None, :], len(lr), 0)
    m1, v = nb_log1p_moments(R.reshape(1, -1), np.log(R / M).reshape(1, -1), n_sd=40.0, min_support=64.0,
                             block_genes=512)
    return {"log_r": lr, "log_mean": lm, "log_m1": np.log(m1.reshape(R.shape)),
            "log_var": np.log(np.maximum(v.reshape(R.shape), 1e-300))}


def _table() -> dict[str, np.ndarray]:
    if not _TABLE:
        _TABLE.update(build_log1p_table())
    return _TABLE


def nb_log1p_moments_fast(r: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[log1p Y] and Var[log1p Y] for Y ~ NB by bilinear interpolation of a precomputed table.

    The table holds ``log E`` and ``log Var`` on a grid of ``log r`` × ``log mean`` (step 0.05,
    ``r`` in [1e-4, 1e4], mean in [1e-5, 1e5]) computed once per process by
    :func:`build_log1p_table`. Points
    outside the grid fall back to :func:`nb_log1p_moments`. Orders of magnitude faster than the
    summation; the interpolation error is bounded in the tests (``tests/models/test_nb_fast.py``)
    and reported by ``benchmarks/bench_nb_predict.py``.
    """
    t = _table()
    r = np.asarray(r, dtype=np.float64)
    b = np.asarray(logits, dtype=np.float64)
    x = np.log(r)
    y = x - b  # log mean = log r − logits
    lr, lm = t["log_r"], t["log_mean"]
    step = float(lr[1] - lr[0])
    fx, fy = (x - lr[0]) / step, (y - lm[0]) / step
    inside = (fx >= 0) & (fx <= len(lr) - 1) & (fy >= 0) & (fy <= len(lm) - 1) & np.isfinite(fx) & np.isfinite(fy)
    i = np.clip(np.floor(fx), 0, len(lr) - 2).astype(np.intp)
    j = np.clip(np.floor(fy), 0, len(lm) - 2).astype(np.intp)
    ax, ay = np.clip(fx - i, 0, 1), np.clip(fy - j, 0, 1)
    w00, w10, w01, w11 = (1 - ax) * (1 - ay), ax * (1 - ay), (1 - ax) * ay, ax * ay
    out = []
    for key in ("log_m1", "log_var"):
        T = t[key]
        out.append(np.exp(w00 * T[i, j] + w10 * T[i + 1, j] + w01 * T[i, j + 1] + w11 * T[i + 1, j + 1]))
    m1, v = out
    if not inside.all():
        rr, cc = np.nonzero(~inside)
        em, ev = nb_log1p_moments(r[rr, cc][None], b[rr, cc][None])
        m1[rr, cc], v[rr, cc] = em[0], ev[0]
    return m1, v
