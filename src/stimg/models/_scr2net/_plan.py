"""Lightning training plan of SCR²Net: λ_r·MSE + λ_p·(1−PCC) + λ_KD·m·‖ŷ − ŷ_ret‖² + λ_con·InfoNCE."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .._contrastive import clamp_scales_, l2_normalize
from ._module import SCR2Module, pcc_loss
from ._retrieval import retrieve

OPTIMIZERS = {
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
}


@dataclass(frozen=True)
class LossWeights:
    """Weights of the SCR²Net objective (paper defaults: 1, 0.25, 0.25; InfoNCE unweighted)."""

    reg: float = 1.0
    pcc: float = 0.25
    kd: float = 0.25
    con: float = 1.0


@dataclass(frozen=True)
class RetrievalConfig:
    """Top-K, number of kept cell types ``T`` (``None``: no filter) and confidence threshold."""

    k: int = 50
    n_types: int | None = 10
    threshold: float = 0.15


def regression_loss(yhat: torch.Tensor, y: torch.Tensor, w: LossWeights) -> torch.Tensor:
    """``λ_r·MSE + λ_p·(1 − PCC)``."""
    return w.reg * F.mse_loss(yhat, y) + w.pcc * pcc_loss(yhat, y)


_HEADS = ("image_head.", "expr_head.", "contrastive.")


def selection_groups(module: SCR2Module) -> dict[str, tuple[str, ...]]:
    """Which parameters are restored from which validation criterion at the end of training.

    On frozen features the two paths are independent networks: the regression path keeps the
    weights of its best validation regression loss, the retrieval heads those of their best
    validation retrieval loss (they overfit at another pace). With a trainable encoder the heads
    read its features, so everything is selected together on the sum of both losses.
    """
    if not module.retrieval:
        return {"reg": ("",)}
    if module.encoder is not None:
        return {"reg+ret": ("",)}
    return {"reg": ("",), "ret": _HEADS}


def _belongs(name: str, prefixes: tuple[str, ...], heads_elsewhere: bool) -> bool:
    if name.startswith("bank_"):
        return False
    if prefixes == ("",):
        return not (heads_elsewhere and name.startswith(_HEADS))
    return name.startswith(prefixes)


def make_plan(module: SCR2Module, *, weights: LossWeights, config: RetrievalConfig, lr: float, weight_decay: float,
              optimizer: str, max_epochs: int, lr_min_ratio: float, augment, kd_start_epoch: int,
              patience: int | None, warmup_epochs: int = 0):
    """The LightningModule that trains ``module`` (built lazily: Lightning is imported on first use).

    With validation data, each group of :func:`selection_groups` keeps the weights of its best
    validation epoch; training stops when no group has improved for ``patience`` epochs
    (``None``: never early). During the first ``warmup_epochs`` only the projection heads train
    (InfoNCE); the regression path starts afterwards, with the distillation term from its first epoch.
    """
    import lightning.pytorch as pl

    groups = selection_groups(module)
    split = "ret" in groups

    class SCR2TrainingPlan(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.module = module
            self.history: list[dict[str, float]] = []
            self.best = {g: float("inf") for g in groups}
            self.best_epoch = {g: -1 for g in groups}
            self.best_state: dict[str, dict[str, torch.Tensor]] = {}
            self._sums: dict[str, list[float]] = {}
            self._val: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []

        # -------------------------------------------------------------- epochs
        def on_train_epoch_start(self):
            self.module.refresh_bank()  # memory-bank keys from the current expression head
            self._sums = {}

        def _acc(self, name: str, value: torch.Tensor, n: int) -> None:
            s = self._sums.setdefault(name, [0.0, 0])
            s[0] += float(value.detach()) * n
            s[1] += n

        def training_step(self, batch, batch_idx):
            x, y, pos = batch
            if augment is not None and self.module.encoder is not None:
                x = augment(x)
            n = y.shape[0]
            warm = self.current_epoch < warmup_epochs
            if warm:  # heads only: no gradient reaches the regression path (or the encoder)
                with torch.no_grad():
                    f = self.module.features(x)
                yhat, loss = None, torch.zeros((), device=y.device)
            else:
                f = self.module.features(x)
                yhat = self.module.regress(f)
                loss = regression_loss(yhat, y, weights)
                self._acc("reg", loss, n)
            if self.module.retrieval:
                fd = f.detach()  # the contrastive loss trains the heads, not the regression features
                zi = self.module.image_embedding(fd)
                ze = self.module.expression_embedding(y)
                con = self.module.contrastive(zi, ze)
                self._acc("con", con, n)
                loss = loss + weights.con * con
                if not warm and weights.kd > 0 and self.current_epoch >= max(kd_start_epoch, warmup_epochs):
                    with torch.no_grad():
                        types = self.module.bank_types if self.module.has_types else None
                        y_ret, m = retrieve(l2_normalize(zi.detach()), self.module.bank_keys,
                                            self.module.bank_values, types, k=config.k, n_types=config.n_types,
                                            threshold=config.threshold, exclude=pos)
                    kd = (m * (yhat - y_ret).pow(2).mean(1)).mean()
                    self._acc("kd", kd, n)
                    self._acc("mask", m.mean(), n)
                    loss = loss + weights.kd * kd
            self._acc("loss", loss, n)
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            clamp_scales_(self.module)  # keep the learnable temperature inside its clamp

        # -------------------------------------------------------------- validation and selection
        def on_validation_epoch_start(self):
            self.module.refresh_bank()  # keys of the heads as they are now

        def validation_step(self, batch, batch_idx):
            x, y, _ = batch
            f = self.module.features(x)
            ret = None
            if self.module.retrieval:
                ret, _ = self.module.retrieve(f, k=config.k, n_types=config.n_types, threshold=config.threshold)
            self._val.append((self.module.regress(f).detach(), ret, y))

        def on_validation_epoch_end(self):
            if not self._val:
                return
            cat = lambda i: torch.cat([v[i] for v in self._val])  # noqa: E731
            y = cat(2)
            vals = {"reg": float(regression_loss(cat(0), y, weights))}
            if self.module.retrieval:
                vals["ret"] = float(regression_loss(cat(1), y, weights))
                vals["reg+ret"] = vals["reg"] + vals["ret"]
            self._val = []
            for k, v in vals.items():
                self._sums[f"val_{k}"] = [v, 1]
            ep = int(self.current_epoch)
            for g in groups:
                if g != "ret" and ep < warmup_epochs:
                    continue  # the regression path has not started
                if vals[g] < self.best[g]:
                    self.best[g], self.best_epoch[g] = vals[g], ep
                    self.best_state[g] = {k: v.detach().clone() for k, v in self.module.state_dict().items()
                                          if _belongs(k, groups[g], split)}
            if patience is not None and all(ep - max(e, warmup_epochs - 1) >= patience
                                            for e in self.best_epoch.values()):
                self.trainer.should_stop = True

        def on_train_epoch_end(self):
            row = {"epoch": float(self.current_epoch)}
            row.update({k if k.startswith("val_") else f"train_{k}": s / max(c, 1) for k, (s, c) in self._sums.items()})
            self.history.append(row)

        def on_train_end(self):
            for state in self.best_state.values():
                self.module.load_state_dict(state, strict=False)
            self.module.refresh_bank()

        def configure_optimizers(self):
            opt = OPTIMIZERS[optimizer]([p for p in self.module.parameters() if p.requires_grad], lr, weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, max_epochs),
                                                               eta_min=lr * lr_min_ratio)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    return SCR2TrainingPlan()


def history_frame(history: list[dict[str, float]]):
    """Per-epoch means as a :class:`~pandas.DataFrame` (``epoch`` as int)."""
    import pandas as pd

    df = pd.DataFrame(history)
    if len(df):
        df["epoch"] = df["epoch"].astype(np.int64)
    return df
