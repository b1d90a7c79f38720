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


def make_plan(module: SCR2Module, *, weights: LossWeights, config: RetrievalConfig, lr: float, weight_decay: float,
              optimizer: str, max_epochs: int, lr_min_ratio: float, augment, kd_start_epoch: int):
    """The LightningModule that trains ``module`` (built lazily: Lightning is imported on first use)."""
    import lightning.pytorch as pl

    class SCR2TrainingPlan(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.module = module
            self.history: list[dict[str, float]] = []
            self.best, self.best_state = float("inf"), None
            self._sums: dict[str, list[float]] = {}
            self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

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
            f = self.module.features(x)
            yhat = self.module.regress(f)
            n = y.shape[0]
            loss = regression_loss(yhat, y, weights)
            self._acc("reg", loss, n)
            if self.module.retrieval:
                fd = f.detach()  # the contrastive loss trains the heads, not the regression features
                zi = self.module.image_embedding(fd)
                ze = self.module.expression_embedding(y)
                con = self.module.contrastive(zi, ze)
                self._acc("con", con, n)
                loss = loss + weights.con * con
                if weights.kd > 0 and self.current_epoch >= kd_start_epoch:
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

        def validation_step(self, batch, batch_idx):
            x, y, _ = batch
            self._val.append((self.module.regress(self.module.features(x)).detach(), y))

        def on_validation_epoch_end(self):
            if not self._val:
                return
            yhat = torch.cat([v[0] for v in self._val])
            y = torch.cat([v[1] for v in self._val])
            self._val = []
            val = float(regression_loss(yhat, y, weights))
            self.log("val_loss", val)
            self._sums["val_loss"] = [val, 1]
            if val < self.best:
                self.best = val
                self.best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}

        def on_train_epoch_end(self):
            row = {"epoch": float(self.current_epoch)}
            row.update({f"train_{k}" if k != "val_loss" else k: s / max(c, 1) for k, (s, c) in self._sums.items()})
            self.history.append(row)

        def on_train_end(self):
            if self.best_state is not None:
                self.module.load_state_dict(self.best_state)
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
