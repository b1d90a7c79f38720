"""The one contrastive core: projection heads, L2 normalisation, CLIP and SigLIP losses.

Every model that aligns two views (image ↔ expression) imports these pieces: the
:class:`~stimg.models.ContrastiveAligner` (HESCAPE/BLEEP) and SCR²Net's retrieval path.

API
---
``ProjectionHead(n_in, n_out=128, n_hidden=None, dropout=0.1)``
    Two-layer MLP (Linear → GELU → Dropout → Linear) into the shared space; ``n_hidden``
    defaults to ``2 * n_in`` (HESCAPE's gene MLP: hidden 2× input). Outputs are *not*
    normalised; the losses and :func:`l2_normalize` do that.
``l2_normalize(x)``
    Unit rows (cosine geometry).
``LogitScale(init_temperature=0.07, min_temperature=0.01, max_temperature=1.0, learnable=True)``
    The learnable temperature, stored as ``log(1 / T)`` (the CLIP "logit scale") and clamped.
``clip_loss(a, b, logit_scale, reduction="mean")`` / ``CLIPLoss``
    Symmetric InfoNCE: ½ (CE(a→b) + CE(b→a)) with logits ``scale · ⟨â, b̂⟩``.
``siglip_loss(a, b, logit_scale, bias, reduction="mean")`` / ``SigLIPLoss``
    Pairwise sigmoid loss with learnable scale and bias.
``make_loss(name, **kwargs)`` and ``LOSSES``
    The registry of contrastive losses (``"clip"``, ``"siglip"``); add one with
    :func:`register_loss`. A loss module is called as ``loss(a, b, reduction=...)`` and has a
    ``temperature`` property.

Both losses L2-normalise their inputs themselves (idempotent), so un-normalised embeddings can
never reach a loss (HESCAPE's code feeds raw projections to it).

Temperature clamp
-----------------
The scale ``s = 1 / T`` multiplies cosine similarities. It is learnt as ``log s`` and clamped
to ``[log(1 / max_temperature), log(1 / min_temperature)]`` — by default ``s ∈ [1, 100]``,
i.e. ``T ∈ [0.01, 1]``: the upper bound 100 is OpenCLIP's, which stops the logits from
growing until training becomes unstable; the lower bound keeps a positive pair at least
``e`` times likelier than an orthogonal one. The clamp acts twice: the forward pass always
uses the clamped value (so the loss never sees a scale outside the range), and
:meth:`LogitScale.clamp_` projects the stored parameter back after each optimiser step (as
OpenCLIP does), so the parameter cannot drift outside where its gradient would vanish.
Call :func:`clamp_scales_` on a module after ``optimizer.step()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOSSES",
    "CLIPLoss",
    "LogitScale",
    "ProjectionHead",
    "SigLIPLoss",
    "clamp_scales_",
    "clip_loss",
    "l2_normalize",
    "make_loss",
    "register_loss",
    "siglip_loss",
]


# --------------------------------------------------------------------------- heads
class ProjectionHead(nn.Module):
    """MLP projection of one view into the shared contrastive space.

    ``Linear(n_in, n_hidden) → GELU → Dropout → Linear(n_hidden, n_out)``. HESCAPE found an
    MLP head better than a linear or transformer head (its Tab. 9).

    Parameters
    ----------
    n_in
        Input features (image-encoder dimension, number of genes, or latent size).
    n_out
        Shared embedding dimension (HESCAPE: 128).
    n_hidden
        Hidden units; ``None`` means ``2 * n_in`` (HESCAPE's gene MLP rule, hidden 2× input).
    dropout
        Dropout after the hidden activation.
    """

    def __init__(self, n_in: int, n_out: int = 128, *, n_hidden: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        if n_in < 1 or n_out < 1:
            msg = f"ProjectionHead needs n_in ≥ 1 and n_out ≥ 1, got n_in={n_in}, n_out={n_out}."
            raise ValueError(msg)
        n_hidden = 2 * n_in if n_hidden is None else int(n_hidden)
        if n_hidden < 1:
            msg = f"n_hidden must be ≥ 1 (or None for 2 × n_in), got {n_hidden}."
            raise ValueError(msg)
        if not 0.0 <= dropout < 1.0:
            msg = f"dropout must lie in [0, 1), got {dropout}."
            raise ValueError(msg)
        self.n_in, self.n_out, self.n_hidden, self.dropout = int(n_in), int(n_out), n_hidden, float(dropout)
        self.net = nn.Sequential(
            nn.Linear(self.n_in, n_hidden), nn.GELU(), nn.Dropout(self.dropout), nn.Linear(n_hidden, self.n_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` of shape ``(n, n_in)`` to ``(n, n_out)`` (not normalised)."""
        return self.net(x)

    def config(self) -> dict[str, float | int]:
        """The constructor arguments (to store in a model header)."""
        return {"n_in": self.n_in, "n_out": self.n_out, "n_hidden": self.n_hidden, "dropout": self.dropout}


def l2_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm (zero rows stay zero)."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


# --------------------------------------------------------------------------- temperature
class LogitScale(nn.Module):
    """Learnable inverse temperature ``s = 1 / T``, stored as ``log s`` and clamped.

    Parameters
    ----------
    init_temperature
        Starting temperature (CLIP: 0.07; SigLIP: 0.1).
    min_temperature, max_temperature
        The clamp: ``T`` stays in ``[min_temperature, max_temperature]`` (default ``[0.01, 1]``,
        i.e. ``s ∈ [1, 100]``; see the module docstring for why).
    learnable
        ``False`` keeps the temperature fixed at ``init_temperature`` (a buffer, not a parameter).
    """

    def __init__(self, init_temperature: float = 0.07, *, min_temperature: float = 0.01,
                 max_temperature: float = 1.0, learnable: bool = True) -> None:
        super().__init__()
        if not 0.0 < min_temperature <= max_temperature:
            msg = (f"need 0 < min_temperature ≤ max_temperature, got {min_temperature} and {max_temperature}.")
            raise ValueError(msg)
        if not min_temperature <= init_temperature <= max_temperature:
            msg = (f"init_temperature={init_temperature} lies outside the clamp "
                   f"[{min_temperature}, {max_temperature}]; choose a value inside it.")
            raise ValueError(msg)
        self.min_log = math.log(1.0 / max_temperature)
        self.max_log = math.log(1.0 / min_temperature)
        value = torch.tensor(math.log(1.0 / init_temperature), dtype=torch.float32)
        if learnable:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)
        self.learnable = bool(learnable)

    def forward(self) -> torch.Tensor:
        """The clamped scale ``s = exp(clamp(log s))`` (a 0-d tensor)."""
        return self.log_scale.clamp(self.min_log, self.max_log).exp()

    @property
    def temperature(self) -> float:
        """Current (clamped) temperature ``T = 1 / s``."""
        return float(1.0 / self.forward().detach())

    @torch.no_grad()
    def clamp_(self) -> LogitScale:
        """Project the stored ``log s`` into the clamp in place (call after an optimiser step)."""
        self.log_scale.clamp_(self.min_log, self.max_log)
        return self

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature:.4g}, clamp=[{math.exp(-self.max_log):.4g}, "
                f"{math.exp(-self.min_log):.4g}], learnable={self.learnable}")


def clamp_scales_(module: nn.Module) -> None:
    """Clamp every :class:`LogitScale` inside ``module`` in place (after ``optimizer.step()``)."""
    for m in module.modules():
        if isinstance(m, LogitScale):
            m.clamp_()


# --------------------------------------------------------------------------- losses
def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape != b.shape:
        msg = (f"contrastive losses need two (n, d) embeddings of one shape (row i of each is a pair), "
               f"got {tuple(a.shape)} and {tuple(b.shape)}.")
        raise ValueError(msg)
    if a.shape[0] < 2:
        msg = "a contrastive loss needs at least 2 pairs in a batch (negatives come from the other rows)."
        raise ValueError(msg)


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "none":
        return per_row
    msg = f"reduction must be 'mean' or 'none', got {reduction!r}."
    raise ValueError(msg)


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float, *,
              reduction: str = "mean") -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): ½ [CE(s·âb̂ᵀ, I) + CE(s·b̂âᵀ, I)].

    Parameters
    ----------
    a, b
        ``(n, d)`` embeddings; row ``i`` of ``a`` and ``b`` is a positive pair, every other row a
        negative. L2-normalised here.
    logit_scale
        Inverse temperature ``s`` (e.g. ``LogitScale()()``).
    reduction
        ``'mean'``, or ``'none'`` for the per-pair terms ½ (CEᵢ(a→b) + CEᵢ(b→a)) whose mean is the loss.

    Returns
    -------
    The mean loss (0-d tensor). For orthonormal pairs it equals ``log(1 + (n - 1) e^{-s})``.
    """
    _check_pair(a, b)
    logits = logit_scale * l2_normalize(a) @ l2_normalize(b).T
    target = torch.arange(a.shape[0], device=a.device)
    per_row = 0.5 * (F.cross_entropy(logits, target, reduction="none")
                     + F.cross_entropy(logits.T, target, reduction="none"))
    return _reduce(per_row, reduction)


def siglip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float,
                bias: torch.Tensor | float, *, reduction: str = "mean") -> torch.Tensor:
    """SigLIP: −(1/n) Σᵢⱼ log σ(zᵢⱼ (s·⟨âᵢ, b̂ⱼ⟩ + bias)), z = +1 on the diagonal, −1 elsewhere.

    Parameters
    ----------
    a, b
        ``(n, d)`` paired embeddings (L2-normalised here).
    logit_scale
        Scale ``s``.
    bias
        Logit bias (SigLIP initialises it at −10 so the many negatives start near zero loss).
    reduction
        ``'mean'``, or ``'none'`` for the per-row sums over ``j`` (their mean is the loss).

    Returns
    -------
    The loss (0-d tensor), summed over pairs and averaged over rows as in the SigLIP paper.
    For orthonormal pairs it equals ``softplus(−(s + bias)) + (n − 1) softplus(bias)``.
    """
    _check_pair(a, b)
    logits = logit_scale * l2_normalize(a) @ l2_normalize(b).T + bias
    z = 2.0 * torch.eye(a.shape[0], device=a.device, dtype=logits.dtype) - 1.0
    return _reduce(-F.logsigmoid(z * logits).sum(1), reduction)


class CLIPLoss(nn.Module):
    """CLIP loss with its learnable, clamped temperature (:class:`LogitScale`).

    Parameters
    ----------
    init_temperature, min_temperature, max_temperature, learnable
        See :class:`LogitScale` (default ``T = 0.07`` clamped to ``[0.01, 1]``).
    """

    def __init__(self, *, init_temperature: float = 0.07, min_temperature: float = 0.01,
                 max_temperature: float = 1.0, learnable: bool = True) -> None:
        super().__init__()
        self.scale = LogitScale(init_temperature, min_temperature=min_temperature,
                                max_temperature=max_temperature, learnable=learnable)

    def forward(self, a: torch.Tensor, b: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        """Loss of the paired rows of ``a`` and ``b`` (``reduction='none'``: per pair)."""
        return clip_loss(a, b, self.scale(), reduction=reduction)

    @property
    def temperature(self) -> float:
        """Current (clamped) temperature."""
        return self.scale.temperature


class SigLIPLoss(nn.Module):
    """SigLIP loss with learnable, clamped temperature and learnable bias.

    Parameters
    ----------
    init_temperature, min_temperature, max_temperature, learnable
        See :class:`LogitScale` (SigLIP starts at ``T = 0.1``, i.e. ``s = 10``).
    init_bias
        Starting bias (SigLIP: −10).
    """

    def __init__(self, *, init_temperature: float = 0.1, min_temperature: float = 0.01,
                 max_temperature: float = 1.0, learnable: bool = True, init_bias: float = -10.0) -> None:
        super().__init__()
        self.scale = LogitScale(init_temperature, min_temperature=min_temperature,
                                max_temperature=max_temperature, learnable=learnable)
        bias = torch.tensor(float(init_bias))
        if learnable:
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("bias", bias)

    def forward(self, a: torch.Tensor, b: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        """Loss of the paired rows of ``a`` and ``b`` (``reduction='none'``: per row)."""
        return siglip_loss(a, b, self.scale(), self.bias, reduction=reduction)

    @property
    def temperature(self) -> float:
        """Current (clamped) temperature."""
        return self.scale.temperature


LOSSES: dict[str, Callable[..., nn.Module]] = {"clip": CLIPLoss, "siglip": SigLIPLoss}


def register_loss(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add a contrastive loss: ``factory(**kwargs)`` returns a module called as ``loss(a, b)``."""
    if name in LOSSES:
        msg = f"a contrastive loss named {name!r} is already registered; choose another name."
        raise ValueError(msg)
    LOSSES[name] = factory


def make_loss(name: str, **kwargs) -> nn.Module:
    """Build the registered contrastive loss ``name`` (``"clip"`` or ``"siglip"``)."""
    if name not in LOSSES:
        msg = f"unknown contrastive loss {name!r}; choose one of {sorted(LOSSES)} or register_loss() your own."
        raise ValueError(msg)
    return LOSSES[name](**kwargs)
