"""Training plan: AdamW (β = 0.9, 0.95), linear warm-up then cosine decay per step, temperature clamp."""

from __future__ import annotations

import math

import torch
from scvi.train import TrainingPlan

from .._contrastive import LogitScale, clamp_scales_


def warmup_cosine(step: int, total: int, warmup: int, final: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to ``final``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))


class ContrastiveTrainingPlan(TrainingPlan):
    """scvi-tools :class:`~scvi.train.TrainingPlan` with HESCAPE's optimisation.

    AdamW with ``betas=(0.9, 0.95)``; weight decay on weight matrices only (not on biases, the
    temperature or the SigLIP bias, as in OpenCLIP); learning rate warmed up linearly over
    ``warmup_fraction`` of all steps, then cosine-decayed to 0; every
    :class:`~stimg.models._contrastive.LogitScale` is clamped after each optimiser step.
    Gradient clipping is the trainer's ``gradient_clip_val``.

    Parameters
    ----------
    module
        The :class:`~stimg.models._align._module.AlignModule`.
    lr
        Peak learning rate.
    weight_decay
        AdamW weight decay.
    betas
        AdamW betas.
    warmup_fraction
        Fraction of all training steps spent warming up (HESCAPE: 780 of 20,000 ≈ 0.04).
    **kwargs
        Passed to :class:`~scvi.train.TrainingPlan`.
    """

    def __init__(self, module, *, lr: float = 1e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_fraction: float = 0.04, **kwargs) -> None:
        super().__init__(module, lr=lr, weight_decay=weight_decay, optimizer="AdamW", **kwargs)
        self.betas, self.warmup_fraction = tuple(betas), float(warmup_fraction)

    def configure_optimizers(self):
        decay, no_decay = [], []
        scales = {id(p) for m in self.module.modules() if isinstance(m, LogitScale) for p in m.parameters()}
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and id(p) not in scales and not name.startswith("contrastive.") else no_decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr, betas=self.betas)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(round(self.warmup_fraction * total)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        clamp_scales_(self.module)
