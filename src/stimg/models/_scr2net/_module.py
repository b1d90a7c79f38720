"""SCR²Net network: regression path (features → two-layer MLP) and retrieval path (projection heads + memory bank)."""

from __future__ import annotations

import torch
from torch import nn

from .._contrastive import l2_normalize
from ._retrieval import retrieve


def pcc_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 − PCC``: Pearson correlation per gene across the spots of the batch, averaged over genes."""
    p = pred - pred.mean(0, keepdim=True)
    t = target - target.mean(0, keepdim=True)
    cov = (p * t).mean(0)
    r = cov / (p.pow(2).mean(0).add(eps).sqrt() * t.pow(2).mean(0).add(eps).sqrt())
    return 1.0 - r.mean()


def robust_std(std: torch.Tensor, rel_floor: float = 0.1) -> torch.Tensor:
    """Standard deviations floored at ``rel_floor`` × their median (and 1e-6).

    A feature (or gene) almost constant on a small training set would otherwise blow up, after
    standardisation, wherever it varies at prediction time (seen with 70 training spots).
    """
    std = std.float()
    floor = max(1e-6, rel_floor * float(std.median())) if std.numel() else 1e-6
    return std.clamp_min(floor)


class SCR2Module(nn.Module):
    """Regression MLP and retrieval heads of SCR²Net, with the memory bank as buffers.

    Parameters
    ----------
    n_input
        Feature width (of the frozen embedding, or of ``encoder``).
    n_genes
        Target genes.
    n_hidden
        Hidden width of the two-layer regression MLP.
    dropout
        Dropout of the regression MLP.
    retrieval
        Build the retrieval path (projection heads, contrastive loss, memory bank).
    n_proj
        Width of the shared image–expression space.
    encoder
        Optional trainable image encoder (``(B, 3, H, W)`` uint8 → ``(B, n_input)``) for end-to-end training.
    feature_mean, feature_std
        Standardisation of the features (buffers).
    gene_mean, gene_std
        Mean and sd of the log1p targets: output bias initialisation and the expression head's input scaling.
    head_kwargs
        Passed to :class:`~stimg.models._contrastive.ProjectionHead` (default: hidden width ``n_proj``,
        as the paper's heads, dropout 0.1).
    contrastive
        Registered contrastive loss of the core (``'clip'``: symmetric InfoNCE with a learnable,
        clamped temperature; ``'siglip'``).
    contrastive_kwargs
        Passed to the loss (e.g. ``init_temperature``).
    """

    def __init__(self, n_input: int, n_genes: int, *, n_hidden: int = 1024, dropout: float = 0.1,
                 retrieval: bool = True, n_proj: int = 256, encoder: nn.Module | None = None,
                 feature_mean=None, feature_std=None, gene_mean=None, gene_std=None,
                 head_kwargs: dict | None = None, contrastive: str = "clip",
                 contrastive_kwargs: dict | None = None) -> None:
        super().__init__()
        as_t = lambda v, n, fill: torch.full((n,), fill) if v is None else torch.as_tensor(v, dtype=torch.float32)  # noqa: E731
        self.register_buffer("feature_mean", as_t(feature_mean, n_input, 0.0))
        self.register_buffer("feature_std", robust_std(as_t(feature_std, n_input, 1.0)))
        self.register_buffer("gene_mean", as_t(gene_mean, n_genes, 0.0))
        self.register_buffer("gene_std", robust_std(as_t(gene_std, n_genes, 1.0)))
        self.encoder = encoder
        self.regressor = nn.Sequential(nn.Linear(n_input, n_hidden), nn.ReLU(), nn.Dropout(dropout),
                                       nn.Linear(n_hidden, n_genes))
        with torch.no_grad():
            self.regressor[-1].weight.mul_(0.1)
            self.regressor[-1].bias.copy_(self.gene_mean)
        self.retrieval = bool(retrieval)
        if self.retrieval:
            from .._contrastive import ProjectionHead, make_loss

            hk = {"n_hidden": n_proj, "dropout": 0.1, **(head_kwargs or {})}
            self.image_head = ProjectionHead(n_input, n_proj, **hk)
            self.expr_head = ProjectionHead(n_genes, n_proj, **hk)
            self.contrastive = make_loss(contrastive, **(contrastive_kwargs or {}))
        # memory bank (training spots): log1p profiles, cell-type codes (−1: none), normalised keys
        self.register_buffer("bank_values", torch.zeros(0, n_genes))
        self.register_buffer("bank_types", torch.zeros(0, dtype=torch.long))
        self.register_buffer("bank_keys", torch.zeros(0, n_proj))

    # ------------------------------------------------------------------ paths
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised features: of ``encoder(x)`` for patches, of ``x`` itself for frozen features."""
        if self.encoder is not None:
            x = self.encoder(x)
        return (x.float() - self.feature_mean) / self.feature_std

    def regress(self, f: torch.Tensor) -> torch.Tensor:
        """Regression path: standardised features → log1p expression."""
        return self.regressor(f)

    def image_embedding(self, f: torch.Tensor) -> torch.Tensor:
        """Unnormalised image projection ``φ_img(f)``."""
        return self.image_head(f)

    def expression_embedding(self, y: torch.Tensor) -> torch.Tensor:
        """Unnormalised expression projection ``φ_expr(y)`` of log1p profiles (standardised per gene)."""
        return self.expr_head((y.float() - self.gene_mean) / self.gene_std)

    # ------------------------------------------------------------------ memory bank
    def set_bank(self, values: torch.Tensor, types: torch.Tensor | None) -> None:
        """Store the training spots' log1p profiles (and cell-type codes) as the memory bank."""
        dev = self.gene_mean.device
        self.bank_values = values.float().to(dev)
        n = values.shape[0]
        self.bank_types = (torch.full((n,), -1, dtype=torch.long) if types is None else types.long()).to(dev)
        self.refresh_bank()

    @torch.no_grad()
    def refresh_bank(self, batch_size: int = 8192) -> None:
        """Recompute the normalised expression keys of the bank with the current head (eval mode)."""
        if not self.retrieval or self.bank_values.shape[0] == 0:
            return
        was = self.expr_head.training
        self.expr_head.eval()
        keys = [l2_normalize(self.expression_embedding(self.bank_values[i:i + batch_size]))
                for i in range(0, self.bank_values.shape[0], batch_size)]
        self.expr_head.train(was)
        self.bank_keys = torch.cat(keys)

    @property
    def has_types(self) -> bool:
        """Whether the bank carries cell types (the majority filter applies)."""
        return bool(self.bank_types.numel()) and bool((self.bank_types >= 0).any())

    @torch.no_grad()
    def retrieve(self, f: torch.Tensor, *, k: int, n_types: int | None, threshold: float,
                 exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft labels ``(B, G)`` and confidence ``(B,)`` for standardised features ``f``."""
        q = l2_normalize(self.image_embedding(f))
        types = self.bank_types if self.has_types else None
        return retrieve(q, self.bank_keys, self.bank_values, types, k=k, n_types=n_types, threshold=threshold,
                        exclude=exclude)
