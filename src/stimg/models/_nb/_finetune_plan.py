"""Training-plan layer of :class:`NBFinetuner`: the Lightning loop (warm-up freezing, two learning rates)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from ._finetune_module import FinetuneModule, augment


class PatchCounts(Dataset):
    """Items ``(uint8 patch, counts)`` for the chosen items of a :class:`~stimg.pp.PatchDataset`."""

    def __init__(self, patches, counts: np.ndarray | None, items: np.ndarray):
        self.patches, self.items = patches, np.asarray(items, dtype=int)
        self.counts = None if counts is None else counts[patches.obs_index[self.items]]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        x = self.patches[int(self.items[i])]
        if self.counts is None:
            return x
        return x, torch.from_numpy(self.counts[i])

    @staticmethod
    def collate(batch: list):
        """Stack patches (and counts)."""
        from ...pp._patch_dataset import PatchDataset

        if isinstance(batch[0], tuple):
            return PatchDataset.collate([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        return PatchDataset.collate(batch)


class FinetuneTrainingPlan(pl.LightningModule):
    """Minimise the NB negative log-likelihood of a :class:`FinetuneModule` with AdamW.

    The head and the encoder have their own learning rates; during the first ``freeze_epochs``
    epochs the encoder is frozen (weights and batch-norm statistics). Logs ``train_nll`` and
    ``val_nll`` (mean per spot; what early stopping and :func:`restore_best` watch) and keeps a
    per-epoch :attr:`history`.
    """

    def __init__(self, module: FinetuneModule, *, lr: float, backbone_lr: float, weight_decay: float,
                 freeze_epochs: int, augment: bool):
        super().__init__()
        self.module = module
        self.lr, self.backbone_lr, self.weight_decay = float(lr), float(backbone_lr), float(weight_decay)
        self.freeze_epochs, self.augment = int(freeze_epochs), bool(augment)
        self.history: list[dict[str, float]] = []
        self._frozen = False
        self._sums = {"train": [0.0, 0], "validation": [0.0, 0]}

    def _set_frozen(self, frozen: bool) -> None:
        self._frozen = frozen
        for p in self.module.encoder.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            self.module.encoder.eval()  # batch-norm statistics stay fixed too

    def on_train_epoch_start(self) -> None:  # noqa: D102
        self._set_frozen(self.current_epoch < self.freeze_epochs)
        self._sums["train"] = [0.0, 0]

    def on_train_batch_start(self, batch, batch_idx) -> None:  # noqa: D102
        if self._frozen:
            self.module.encoder.eval()

    def on_train_end(self) -> None:  # noqa: D102
        self._set_frozen(False)

    def _step(self, batch, split: str) -> torch.Tensor:
        x, y = batch
        if split == "train" and self.augment:
            x = augment(x)
        if self._frozen:
            with torch.no_grad():
                feats = self.module.features(x)
        else:
            feats = self.module.features(x)
        nll = self.module.loss(*self.module.nb_params(feats), y)
        s = self._sums[split]
        s[0] += float(nll.detach().sum())
        s[1] += int(nll.shape[0])
        loss = nll.mean()
        name = "train_nll" if split == "train" else "val_nll"
        self.log(name, loss, on_step=False, on_epoch=True, batch_size=int(y.shape[0]), sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):  # noqa: D102
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # noqa: D102
        return self._step(batch, "validation")

    def on_validation_epoch_start(self) -> None:  # noqa: D102
        self._sums["validation"] = [0.0, 0]

    def on_train_epoch_end(self) -> None:  # noqa: D102
        s, n = self._sums["train"]
        row = {"epoch": self.current_epoch, "train_nll": s / max(n, 1), "frozen": self._frozen}
        vs, vn = self._sums["validation"]
        if vn:
            row["val_nll"] = vs / vn
        self.history.append(row)

    def configure_optimizers(self):  # noqa: D102
        groups = [{"params": list(self.module.head.parameters()), "lr": self.lr},
                  {"params": list(self.module.encoder.parameters()), "lr": self.backbone_lr}]
        return torch.optim.AdamW(groups, weight_decay=self.weight_decay)
