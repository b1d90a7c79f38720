"""End-to-end fine-tuning of an image encoder with the negative-binomial head (STImage, DESIGN §4, issue 4)."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..._constants import TABLE_KEY, TARGET_KEY
from ..._logging import logger
from ..._prediction import ExpressionPrediction
from ..._settings import settings
from ..._spatial import get_table
from ..._utils import progress_bar, resolve_device, warn
from ..._validate import check_indices, check_matrix, check_nonempty
from ._conformal import (
    ConformalCalibration,
    coverage_scores,
    cross_conformal,
    resolve_calibrated,
    training_groups,
)
from ._model import _counts_source, _interval, _moments, _resolve_genes
from ._module import NBModule, nb_log_prob

_FORMAT = "stimg.NBFinetuner/1"
_N_STATS = 256  # training patches used to standardise the initial features


# ---------------------------------------------------------------------------------------------- data
def _target_counts(table, genes: list[str], layer: str | None) -> np.ndarray:
    src = _counts_source(table, layer)
    y = check_matrix(src[:, table.var_names.get_indexer(genes)], "target counts", n_obs=table.n_obs)
    if (y < 0).any():
        msg = "counts must be non-negative; pass the raw-count layer with layer=."
        raise ValueError(msg)
    if not np.allclose(y, np.round(y)):
        warn("target counts are not integers; the NB likelihood expects raw counts (pass layer=).")
    return y.astype(np.float32)


class _PatchCounts(Dataset):
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
        from ...pp._patch_dataset import PatchDataset

        if isinstance(batch[0], tuple):
            return PatchDataset.collate([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        return PatchDataset.collate(batch)


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Random element of the dihedral group (flips and 90° rotations) per square patch, on ``x``'s device."""
    b = x.shape[0]
    f = torch.randint(0, 2, (3, b, 1, 1, 1), device=x.device, dtype=torch.bool)
    x = torch.where(f[0], x.flip(-1), x)
    x = torch.where(f[1], x.flip(-2), x)
    return torch.where(f[2], x.transpose(-1, -2), x)


# ---------------------------------------------------------------------------------------------- network
class _FinetuneNet(nn.Module):
    """Encoder (uint8 patches → features) followed by the NB head of :class:`NBModule`."""

    def __init__(self, encoder: nn.Module, head: NBModule):
        super().__init__()
        self.encoder, self.head = encoder, head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda" and not torch.is_autocast_enabled():
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                return self.encoder(x).float()
        return self.encoder(x).float()

    def nb_params(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(feats.device.type, enabled=False):  # NB maths in float32
            o = self.head.inference(feats.float())
        return o["r"], o["logits"]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.nb_params(self.features(x))


def _nll(r: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-spot NB negative log-likelihood summed over genes."""
    return -nb_log_prob(y.float(), r, logits).sum(-1)


def _lightning_module(net: _FinetuneNet, *, lr: float, backbone_lr: float, weight_decay: float,
                      freeze_epochs: int, augment: bool):
    import lightning.pytorch as pl

    class _Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.module = net
            self.history: list[dict[str, float]] = []
            self.best, self.best_state = float("inf"), None
            self._frozen = False
            self._sums = {"train": [0.0, 0], "validation": [0.0, 0]}

        def _set_frozen(self, frozen: bool) -> None:
            self._frozen = frozen
            for p in self.module.encoder.parameters():
                p.requires_grad_(not frozen)
            if frozen:
                self.module.encoder.eval()  # batch-norm statistics stay fixed too

        def on_train_epoch_start(self):
            self._set_frozen(self.current_epoch < freeze_epochs)
            self._sums["train"] = [0.0, 0]

        def on_train_batch_start(self, batch, batch_idx):
            if self._frozen:
                self.module.encoder.eval()

        def on_train_end(self):
            self._set_frozen(False)
            if self.best_state is not None:
                self.module.load_state_dict(self.best_state)

        def _step(self, batch, split: str):
            x, y = batch
            if split == "train" and augment:
                x = _augment(x)
            if self._frozen:
                with torch.no_grad():
                    feats = self.module.features(x)
            else:
                feats = self.module.features(x)
            nll = _nll(*self.module.nb_params(feats), y)
            s = self._sums[split]
            s[0] += float(nll.detach().sum())
            s[1] += int(nll.shape[0])
            return nll.mean()

        def training_step(self, batch, batch_idx):
            loss = self._step(batch, "train")
            self.log("train_nll", loss, on_step=False, on_epoch=True, batch_size=batch[1].shape[0])
            return loss

        def validation_step(self, batch, batch_idx):
            return self._step(batch, "validation")

        def on_validation_epoch_start(self):
            self._sums["validation"] = [0.0, 0]

        def on_validation_epoch_end(self):
            s, n = self._sums["validation"]
            if n == 0:
                return
            val = s / n
            self.log("val_nll", val)
            if val < self.best:
                self.best = val
                self.best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}

        def on_train_epoch_end(self):
            s, n = self._sums["train"]
            row = {"epoch": self.current_epoch, "train_nll": s / max(n, 1), "frozen": self._frozen}
            vs, vn = self._sums["validation"]
            if vn:
                row["val_nll"] = vs / vn
            self.history.append(row)

        def configure_optimizers(self):
            head = [p for p in self.module.head.parameters()]
            backbone = [p for p in self.module.encoder.parameters()]
            return torch.optim.AdamW([{"params": head, "lr": lr}, {"params": backbone, "lr": backbone_lr}],
                                     weight_decay=weight_decay)

    return _Lit()


def _trainer_accelerator(accelerator: str | None) -> tuple[str, str]:
    """Lightning accelerator name and default precision for ``accelerator``."""
    dev = resolve_device(accelerator)
    if dev.type == "cuda":
        return "gpu", "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return dev.type, "32"


# ---------------------------------------------------------------------------------------------- model
class NBFinetuner:
    """Fine-tune an image encoder end to end with the negative-binomial head (STImage).

    Each spot's H&E patch goes through a trainable encoder (any :func:`stimg.encoders.get_encoder`
    model) and the NB head of :class:`~stimg.models.NBRegressor` (``r = softplus(·)``,
    ``p = sigmoid(·)``); training minimises the NB negative log-likelihood of the raw counts with
    Lightning, on a GPU with mixed precision when there is one and in float32 on the CPU. The
    backbone can be frozen for a few warm-up epochs and gets its own (smaller) learning rate;
    training patches are randomly flipped and rotated by multiples of 90°. Nothing is written
    into ``data``.

    Parameters
    ----------
    data
        SpatialData or AnnData with the H&E images and raw counts (the training data).
    encoder
        Encoder name (e.g. ``'efficientnet_lite0'``, the offline default), a
        :class:`torch.nn.Module` returning ``(B, dim)`` features, or an
        :class:`~stimg.encoders.Encoder`. A module is fine-tuned in place.
    genes
        Target genes (overrides ``target_key``).
    target_key
        Boolean ``.var`` column of target genes; ``None`` uses all genes.
    layer
        Layer with raw counts; ``None`` uses ``X``.
    patch_um
        Side of the patch around each spot in µm.
    patch_px
        Side of the patch in pixels; ``None`` uses the encoder's input size.
    table_key
        Table of a SpatialData object.
    library_key
        ``.obs`` column of section ids (see :func:`stimg.pp.extract_patches`).
    pretrained
        Start from the encoder's pretrained weights (``False``: random weights).
    input_px
        Network input side; ``None`` keeps the encoder's. CNNs pool globally, so
        ``input_px=patch_px`` trains at the patch size without resizing.
    n_hidden, n_layers, dropout
        NB head (as :class:`~stimg.models.NBRegressor`).
    seed
        Seed of the head initialisation and default seed of :meth:`train`.
    encoder_kwargs
        Passed to :func:`~stimg.encoders.get_encoder` (e.g. ``weights=``).

    Attributes
    ----------
    genes_
        Target genes (prediction columns).
    history_
        Per-epoch mean training (and validation) NLL per spot, after :meth:`train`.

    Examples
    --------
    >>> import stimg as si
    >>> sdata = si.datasets.synthetic(36, 6, mpp=4.0)
    >>> m = si.models.NBFinetuner(sdata, target_key=None, patch_px=32, input_px=32, pretrained=False)
    >>> m.train(max_epochs=1, batch_size=16, accelerator="cpu", early_stopping=False, validation_size=0)  # doctest: +SKIP
    >>> m.predict(sdata).mean.shape  # doctest: +SKIP
    (36, 6)
    >>> si.tl.predict_expression(sdata, m)  # writes .layers['si_pred']  # doctest: +SKIP
    """

    needs_images = True

    def __init__(
        self,
        data: Any,
        *,
        encoder: str | nn.Module = "efficientnet_lite0",
        genes: Sequence[str] | None = None,
        target_key: str | None = TARGET_KEY,
        layer: str | None = None,
        patch_um: float = 112.0,
        patch_px: int | None = None,
        table_key: str = TABLE_KEY,
        library_key: str | None = None,
        pretrained: bool = True,
        input_px: int | None = None,
        n_hidden: int = 256,
        n_layers: int = 1,
        dropout: float = 0.1,
        seed: int = 0,
        encoder_kwargs: dict[str, Any] | None = None,
    ):
        from ...encoders import get_encoder
        from ...pp import extract_patches

        table = get_table(data, table_key)
        self.genes_ = _resolve_genes(table, target_key, genes, require_key=True)
        counts = _target_counts(table, self.genes_, layer)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            enc = get_encoder(encoder, pretrained=pretrained, **(encoder_kwargs or {}))
            if input_px is not None:
                enc.input_px, enc.resize_px, enc._dim = int(input_px), None, None
            patch_px = int(patch_px or enc.input_px)
            patches = extract_patches(data, patch_um=patch_um, patch_px=patch_px, table_key=table_key,
                                      library_key=library_key)
            head = NBModule(enc.dim, len(self.genes_), n_hidden=n_hidden, n_layers=n_layers, dropout=dropout,
                            gene_mean=counts.mean(0))
        self.net = _FinetuneNet(enc, head)
        self._patches, self._counts = patches, counts
        self._data = data  # for cross-conformal calibration folds
        self._pretrained = bool(pretrained)
        self._train_kwargs: dict[str, Any] = {}
        self.calibration_: ConformalCalibration | None = None
        self.seed_ = int(seed)
        self.is_trained_ = False
        self.history_: pd.DataFrame | None = None
        self.init_params_ = {
            "encoder": encoder if isinstance(encoder, str) else None, "genes": list(self.genes_),
            "layer": layer, "patch_um": float(patch_um), "patch_px": patch_px, "table_key": table_key,
            "library_key": library_key, "input_px": input_px, "n_hidden": n_hidden, "n_layers": n_layers,
            "dropout": dropout, "seed": int(seed), "encoder_kwargs": encoder_kwargs,
        }
        logger.info("NBFinetuner: %s (%d features) → %d genes on %d spots, %g µm patches at %d px",
                    enc.name, enc.dim, len(self.genes_), table.n_obs, patch_um, patch_px)

    def __repr__(self) -> str:
        state = "trained" if self.is_trained_ else "untrained"
        return (f"NBFinetuner({self.net.encoder.name!r} → {len(self.genes_)} genes, "
                f"{self.init_params_['patch_um']:g} µm at {self.init_params_['patch_px']} px, {state})")

    # ------------------------------------------------------------------ training
    def _split(self, train_indices, validation_size: float, early_stopping: bool, seed: int):
        n = len(self._counts)
        tr = check_indices(train_indices, n)
        check_nonempty(tr.size, "The training set", "pass train_indices with at least one spot.")
        if not 0 <= validation_size < 1:
            msg = f"validation_size must be in [0, 1), got {validation_size!r}."
            raise ValueError(msg)
        tr = np.random.default_rng(seed).permutation(np.unique(tr))
        n_val = int(round(validation_size * tr.size))
        if early_stopping:
            n_val = max(1, n_val)
        if n_val >= tr.size:
            msg = (f"validation_size={validation_size} (early_stopping={early_stopping}) leaves no training spots "
                   f"out of {tr.size}.")
            raise ValueError(msg)
        # table rows → PatchDataset items
        item_of_row = np.empty(n, dtype=int)
        item_of_row[self._patches.obs_index] = np.arange(len(self._patches))
        return np.sort(tr[n_val:]), np.sort(tr[:n_val]), item_of_row

    @torch.no_grad()
    def _init_feature_stats(self, items: np.ndarray, batch_size: int, device: torch.device, seed: int) -> None:
        """Standardise the head's input with the (pretrained) features of up to 256 training patches."""
        sel = np.random.default_rng(seed).permutation(items)[:_N_STATS]
        feats = self._features(_PatchCounts(self._patches, None, np.sort(sel)), batch_size, device, 0, "features")
        head = self.net.head
        head.feature_mean.copy_(torch.from_numpy(feats.mean(0)))
        head.feature_std.copy_(torch.from_numpy(feats.std(0)).clamp_min(1e-6))

    def train(
        self,
        max_epochs: int = 10,
        *,
        batch_size: int = 32,
        lr: float = 1e-3,
        backbone_lr: float = 1e-4,
        freeze_backbone_epochs: int = 0,
        train_indices: Sequence[int] | np.ndarray | None = None,
        validation_size: float = 0.1,
        accelerator: str | None = "auto",
        devices: int | str = 1,
        precision: str | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int = 3,
        weight_decay: float = 1e-4,
        augment: bool = True,
        num_workers: int = 0,
        seed: int | None = None,
        progress: bool | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        """Fine-tune encoder and head by minimising the NB negative log-likelihood (Lightning, AdamW).

        Parameters
        ----------
        max_epochs
            Maximum number of epochs.
        batch_size
            Patches per step.
        lr
            Learning rate of the NB head.
        backbone_lr
            Learning rate of the encoder (usually 10× smaller).
        freeze_backbone_epochs
            Warm-up epochs that train the head only (encoder weights and batch-norm statistics fixed).
        train_indices
            Table rows (integer positions or a boolean mask) to train on; the rest is never seen.
            ``None`` uses all spots.
        validation_size
            Fraction of the training spots held out (drawn with ``seed``) for early stopping.
        accelerator
            ``'auto'``, ``'cpu'``, ``'gpu'``/``'cuda'``, ``'mps'``; ``None`` uses :attr:`stimg.settings.accelerator`.
        devices
            Lightning devices (one device by default).
        precision
            Lightning precision; ``None`` uses ``'bf16-mixed'`` (or ``'16-mixed'``) on CUDA, ``'32'`` otherwise.
        early_stopping
            Stop when the validation NLL has not improved for ``early_stopping_patience`` epochs and
            restore the weights of the best validation epoch.
        early_stopping_patience
            Patience in epochs.
        weight_decay
            AdamW weight decay.
        augment
            Random flips and 90° rotations of the training patches.
        num_workers
            :class:`~torch.utils.data.DataLoader` workers reading patches.
        seed
            Seed of the split, the minibatch order and the augmentation; ``None`` uses the model's.
        progress
            Lightning progress bar; ``None`` uses :attr:`stimg.settings.progress`.
        **trainer_kwargs
            Passed to :class:`lightning.pytorch.Trainer`.

        Examples
        --------
        >>> m.train(max_epochs=10, freeze_backbone_epochs=1, accelerator="auto")  # doctest: +SKIP
        >>> m.history_  # doctest: +SKIP
        """
        import lightning.pytorch as pl
        from lightning.fabric.utilities.warnings import PossibleUserWarning
        from lightning.pytorch.callbacks import EarlyStopping

        recorded = {"max_epochs": max_epochs, "batch_size": batch_size, "lr": lr, "backbone_lr": backbone_lr,
                    "freeze_backbone_epochs": freeze_backbone_epochs, "validation_size": validation_size,
                    "accelerator": accelerator, "devices": devices, "precision": precision,
                    "early_stopping": early_stopping, "early_stopping_patience": early_stopping_patience,
                    "weight_decay": weight_decay, "augment": augment, "num_workers": num_workers,
                    **{k: v for k, v in trainer_kwargs.items() if k != "callbacks"}}
        seed = self.seed_ if seed is None else int(seed)
        tr, val, item_of_row = self._split(train_indices, validation_size, early_stopping, seed)
        acc, default_precision = _trainer_accelerator(accelerator)
        device = resolve_device(accelerator)
        if int(batch_size) < 1 or int(max_epochs) < 1:
            msg = f"batch_size and max_epochs must be ≥ 1, got {batch_size!r} and {max_epochs!r}."
            raise ValueError(msg)
        if freeze_backbone_epochs < 0:
            msg = f"freeze_backbone_epochs must be ≥ 0, got {freeze_backbone_epochs!r}."
            raise ValueError(msg)
        lit = _lightning_module(self.net, lr=lr, backbone_lr=backbone_lr, weight_decay=weight_decay,
                                freeze_epochs=int(freeze_backbone_epochs), augment=augment)
        callbacks = list(trainer_kwargs.pop("callbacks", []))
        if early_stopping:
            callbacks.append(EarlyStopping(monitor="val_nll", patience=early_stopping_patience, mode="min"))
        trainer_kwargs.setdefault("enable_progress_bar", settings.progress if progress is None else progress)
        train_ds = _PatchCounts(self._patches, self._counts, item_of_row[tr])
        gen = torch.Generator().manual_seed(seed)
        # a last batch of one patch breaks batch norm on 1×1 feature maps: drop it
        drop_last = len(train_ds) > batch_size and len(train_ds) % batch_size == 1
        loaders = {"train_dataloaders": DataLoader(
            train_ds, batch_size=batch_size, shuffle=True, num_workers=num_workers, collate_fn=_PatchCounts.collate,
            generator=gen, drop_last=drop_last, persistent_workers=num_workers > 0)}
        if val.size:
            loaders["val_dataloaders"] = DataLoader(
                _PatchCounts(self._patches, self._counts, item_of_row[val]), batch_size=batch_size,
                num_workers=num_workers, collate_fn=_PatchCounts.collate)
        quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
        old = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.WARNING)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=PossibleUserWarning)
                warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
                warnings.filterwarnings("ignore", message=".*treespec.*")
                trainer = pl.Trainer(
                    accelerator=acc, devices=devices, precision=precision or default_precision,
                    max_epochs=int(max_epochs), callbacks=callbacks, logger=False, enable_checkpointing=False,
                    enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, **trainer_kwargs,
                )
                torch.manual_seed(seed)
                if not self.is_trained_:
                    self._init_feature_stats(item_of_row[tr], batch_size, device, seed)
                trainer.fit(lit, **loaders)
        finally:
            for lg, lv in zip(quiet, old, strict=True):
                lg.setLevel(lv)
            self.net.cpu()
        self.net.eval()
        self._refresh_cache_key()
        self.history_ = pd.DataFrame(lit.history)
        self.train_indices_, self.validation_indices_ = tr, val
        self._train_kwargs = recorded
        self.calibration_ = None
        self.is_trained_ = True
        if lit.best_state is not None:
            logger.info("NBFinetuner: %d epochs, best validation NLL %.4g", len(lit.history), lit.best)

    def _refresh_cache_key(self) -> None:
        from ...encoders._build import weights_fingerprint

        enc = self.net.encoder
        enc.cache_key = f"{enc.name}:finetuned:{weights_fingerprint(enc.net)}"

    # ------------------------------------------------------------------ inference
    def _dataset(self, data: Any, table_key: str | None) -> tuple[Any, Any]:
        from ...pp import extract_patches

        p = self.init_params_
        table_key = p["table_key"] if table_key is None else table_key
        table = get_table(data, table_key)
        ds = extract_patches(data, patch_um=p["patch_um"], patch_px=p["patch_px"], table_key=table_key,
                             library_key=p["library_key"])
        if len(np.unique(ds.obs_index)) != table.n_obs:
            msg = (f"Only {len(np.unique(ds.obs_index))} of {table.n_obs} spots have an image; predict on the "
                   "spots of sections with images.")
            raise ValueError(msg)
        return table, ds

    @torch.inference_mode()
    def _features(self, ds: Dataset, batch_size: int, device: torch.device, num_workers: int, what: str,
                  progress: bool | None = False) -> np.ndarray:
        """Run the encoder (``what='features'``) or the whole network (``'nb'``) over ``ds`` in eval mode."""
        self.net.to(device).eval()
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_PatchCounts.collate)
        out = []
        try:
            for x in progress_bar(loader, desc="NBFinetuner", total=len(loader), progress=progress):
                f = self.net.features(x.to(device, non_blocking=True))
                if what == "nb":
                    r, b = self.net.nb_params(f)
                    f = torch.cat([r, b], dim=-1)
                out.append(f.double().cpu())
        finally:
            self.net.cpu()
        return torch.cat(out).numpy()

    def _per_row(self, data, table_key, what: str, batch_size: int, accelerator: str | None, num_workers: int):
        table, ds = self._dataset(data, table_key)
        vals = self._features(_PatchCounts(ds, None, np.arange(len(ds))), batch_size, resolve_device(accelerator),
                              num_workers, what, progress=None)
        out = np.empty_like(vals)
        out[ds.obs_index] = vals
        return table, out

    def get_nb_params(self, data: Any, *, table_key: str | None = None, batch_size: int = 64,
                      accelerator: str | None = "auto", num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """NB ``r`` and success logits (``p = sigmoid(logits)``), each ``(n_obs, n_genes)`` in table order.

        Parameters
        ----------
        data
            SpatialData or AnnData with the images (any genes).
        table_key
            Table of a SpatialData object (``None``: the one used for training).
        batch_size
            Patches per forward pass.
        accelerator
            Device for inference.
        num_workers
            DataLoader workers.

        Examples
        --------
        >>> r, logits = m.get_nb_params(sdata)  # doctest: +SKIP
        """
        _, rb = self._per_row(data, table_key, "nb", batch_size, accelerator, num_workers)
        g = len(self.genes_)
        return rb[:, :g], rb[:, g:]

    def predict(self, data: Any, *, scale: str = "log1p", **kwargs: Any) -> ExpressionPrediction:
        """Predicted expression and aleatoric variance per spot and gene, read from the images of ``data``.

        As :meth:`NBRegressor.predict <stimg.models.NBRegressor.predict>`: ``scale='log1p'`` gives
        the exact ``E[log1p Y]`` and ``Var[log1p Y]`` under the predicted NB, ``'counts'`` the NB
        mean and variance.

        Parameters
        ----------
        data
            SpatialData or AnnData with the images (not just the table).
        scale
            ``'log1p'`` or ``'counts'``.
        **kwargs
            Passed to :meth:`get_nb_params`.

        Returns
        -------
        :class:`~stimg.tl.ExpressionPrediction` over :attr:`genes_`, ``epistemic=None``.

        Examples
        --------
        >>> pred = m.predict(sdata)  # doctest: +SKIP
        """
        if scale not in ("log1p", "counts"):
            msg = f"scale must be 'log1p' or 'counts', got {scale!r}."
            raise ValueError(msg)
        r, b = self.get_nb_params(data, **kwargs)
        mean, var = _moments(r, b, scale)
        return ExpressionPrediction(mean=mean, var_names=list(self.genes_), scale=scale, aleatoric=var)

    def predict_interval(self, data: Any, level: float = 0.9, *, calibrated: bool | None = None,
                         **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Central predictive interval of the counts (NB quantiles; conformally calibrated after :meth:`calibrate`).

        Parameters
        ----------
        data
            SpatialData or AnnData with the images.
        level
            Nominal coverage in (0, 1).
        calibrated
            ``None``: calibrated when :meth:`calibrate` has run; ``True``: require it; ``False``:
            the raw NB quantiles ``(1 ± level)/2``.
        **kwargs
            Passed to :meth:`get_nb_params`.

        Returns
        -------
        ``(lower, upper)`` counts, each ``(n_obs, n_genes)``.

        Examples
        --------
        >>> lo, hi = m.predict_interval(sdata, level=0.9)  # doctest: +SKIP
        """
        if not 0 < level < 1:
            msg = f"level must be in (0, 1), got {level!r}."
            raise ValueError(msg)
        cal = resolve_calibrated(self, calibrated)
        r, b = self.get_nb_params(data, **kwargs)
        return _interval(r[None], b[None], level, cal)

    def _rows_nb_params(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """NB parameters of training-table rows, read from the training patches."""
        item_of_row = np.empty(len(self._counts), dtype=int)
        item_of_row[self._patches.obs_index] = np.arange(len(self._patches))
        kw = self._train_kwargs
        rb = self._features(_PatchCounts(self._patches, None, item_of_row[rows]), int(kw.get("batch_size", 32)),
                            resolve_device(kw.get("accelerator", "auto")), 0, "nb")
        g = len(self.genes_)
        return rb[:, :g], rb[:, g:]

    def calibrate(self, groups: str | Sequence | np.ndarray | None = "library_id", *,
                  calibration_indices: Sequence[int] | np.ndarray | None = None, per_gene: bool = False,
                  progress: bool | None = None) -> NBFinetuner:
        """Conformally calibrate :meth:`predict_interval` (see :meth:`NBRegressor.calibrate <stimg.models.NBRegressor.calibrate>`).

        Split-conformal on ``calibration_indices`` (training-table spots held out of training) is
        cheap; cross-conformal over ``groups`` fine-tunes one encoder per training section.

        Parameters
        ----------
        groups
            ``.obs`` column (or one label per spot) of the training sections left out in turn.
        calibration_indices
            Spots not used in training: split-conformal instead (no retraining).
        per_gene
            One calibrated level per gene instead of one level shared by all genes (the default, which
            held nominal coverage across patients in benchmarks/conformal_her2st.py).
        progress
            Progress bar over the folds.

        Returns
        -------
        The model, with ``calibration_`` set.

        Examples
        --------
        >>> m.train(train_indices=train)  # doctest: +SKIP
        >>> m.calibrate(calibration_indices=held_out)  # doctest: +SKIP
        """
        if not self.is_trained_:
            msg = "train the model before calibrating it."
            raise RuntimeError(msg)
        n = len(self._counts)
        if calibration_indices is not None:
            held = check_indices(calibration_indices, n, "calibration_indices")
            if (seen := np.intersect1d(held, np.r_[self.train_indices_, self.validation_indices_])).size:
                msg = (f"{seen.size} calibration spots were used in training; pass spots held out of training "
                       "(train with train_indices= excluding them).")
                raise ValueError(msg)
            r, b = self._rows_nb_params(held)
            self.calibration_ = ConformalCalibration.from_scores(coverage_scores(r, b, self._counts[held]),
                                                                 method="split", per_gene=per_gene)
            return self
        p = dict(self.init_params_)
        if p["encoder"] is None:
            msg = ("cross-conformal calibration re-trains the model and needs an encoder name; with a custom module "
                   "pass calibration_indices= (split-conformal) instead.")
            raise ValueError(msg)
        rows = np.sort(np.r_[self.train_indices_, self.validation_indices_])
        table = get_table(self._data, p["table_key"])
        labels = training_groups(table, groups, rows)

        def fit_params(fit, held):
            m = type(self)(self._data, pretrained=self._pretrained, target_key=None, **p)
            m.train(**{**self._train_kwargs, "train_indices": fit, "progress": False})
            return m._rows_nb_params(held)

        self.calibration_ = cross_conformal(fit_params, lambda rows: self._counts[rows], rows, labels,
                                            per_gene=per_gene, progress=progress)
        return self

    def get_embedding(self, data: Any, *, table_key: str | None = None, batch_size: int = 64,
                      accelerator: str | None = "auto", num_workers: int = 0) -> np.ndarray:
        """Features of the fine-tuned encoder, ``(n_obs, dim)`` float32 in table order.

        Store them in ``.obsm`` to train :class:`~stimg.models.NBRegressor`,
        :class:`~stimg.models.NBEnsemble` or :class:`~stimg.models.RidgeRegressor` on them.

        Examples
        --------
        >>> sdata["table"].obsm["X_finetuned"] = m.get_embedding(sdata)  # doctest: +SKIP
        """
        _, f = self._per_row(data, table_key, "features", batch_size, accelerator, num_workers)
        return f.astype(np.float32)

    # ------------------------------------------------------------------ persistence
    def save(self, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``params.json`` (init parameters, genes, history) and ``model.pt`` (state dict) to a folder.

        Examples
        --------
        >>> m.save("finetuned/", overwrite=True)  # doctest: +SKIP
        """
        d = Path(dir_path)
        if d.exists() and any(d.iterdir()) and not overwrite:
            msg = f"{str(d)!r} exists and is not empty; pass overwrite=True to replace it."
            raise FileExistsError(msg)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"format": _FORMAT, "init_params": self.init_params_, "is_trained": self.is_trained_,
                "history": None if self.history_ is None else self.history_.to_dict(orient="list")}
        (d / "params.json").write_text(json.dumps(meta, indent=1, default=str))
        torch.save(self.net.state_dict(), d / "model.pt")

    @classmethod
    def load(cls, dir_path: str | os.PathLike, data: Any, *, encoder: nn.Module | None = None) -> NBFinetuner:
        """Load a model written by :meth:`save` onto ``data`` (the training data or any data with images).

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        data
            SpatialData/AnnData with images and the model's genes.
        encoder
            The module for a model whose encoder was a :class:`torch.nn.Module` (its weights are
            replaced by the saved ones).

        Examples
        --------
        >>> m = si.models.NBFinetuner.load("finetuned/", sdata)  # doctest: +SKIP
        """
        d = Path(dir_path)
        if not (d / "params.json").is_file() or not (d / "model.pt").is_file():
            msg = f"{str(d)!r} has no params.json/model.pt; pass a folder written by NBFinetuner.save."
            raise FileNotFoundError(msg)
        meta = json.loads((d / "params.json").read_text())
        if meta.get("format") != _FORMAT:
            msg = f"{str(d)!r} was not written by NBFinetuner.save."
            raise ValueError(msg)
        p = dict(meta["init_params"])
        if p["encoder"] is None and encoder is None:
            msg = "This model was trained with a custom torch.nn.Module encoder; pass the same module as encoder=."
            raise ValueError(msg)
        p["encoder"] = encoder if p["encoder"] is None else p["encoder"]
        model = cls(data, pretrained=False, target_key=None, **p)
        model.net.load_state_dict(torch.load(d / "model.pt", map_location="cpu", weights_only=True))
        model.net.eval()
        model._refresh_cache_key()
        model.init_params_["encoder"] = meta["init_params"]["encoder"]
        model.is_trained_ = bool(meta.get("is_trained", True))
        if meta.get("history") is not None:
            model.history_ = pd.DataFrame(meta["history"])
        return model
