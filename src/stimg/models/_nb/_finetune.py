"""End-to-end fine-tuning of an image encoder with the negative-binomial head (STImage, DESIGN §4, issue 4)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..._constants import TABLE_KEY, TARGET_KEY
from ..._docs import d
from ..._logging import logger
from ..._prediction import ExpressionPrediction
from ..._settings import settings
from ..._spatial import get_table
from ..._utils import progress_bar, resolve_device
from .._base import ModelIO, check_trained, resolve_train_indices, train_defaults
from ._conformal import (
    ConformalCalibration,
    coverage_scores,
    cross_conformal,
    resolve_calibrated,
    training_groups,
)
from ._data import resolve_genes, target_counts
from ._finetune_module import FinetuneModule
from ._finetune_plan import FinetuneTrainingPlan, PatchCounts
from ._model import (
    _check_level,
    _check_scale,
    _get_calibration,
    _interval,
    _jsonable,
    _moments,
    _put_calibration,
)
from ._module import NBModule
from ._training import quiet_lightning, restore_best, split_train_validation

_N_STATS = 256  # training patches used to standardise the initial features
_DEFAULT_EPOCHS = 10


def _trainer_accelerator(accelerator: str | None) -> tuple[str, str]:
    """Lightning accelerator name and default precision for ``accelerator``."""
    dev = resolve_device(accelerator)
    if dev.type == "cuda":
        return "gpu", "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return dev.type, "32"


# ---------------------------------------------------------------------------------------------- model
class NBFinetuner(ModelIO):
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
        Seed of the head initialisation and default seed of :meth:`train`; ``None`` uses
        :attr:`stimg.settings.seed`.
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
        seed: int | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
    ):
        if seed is None:
            seed = train_defaults().seed
        table = get_table(data, table_key)
        genes = resolve_genes(table, target_key, genes, require_key=True)
        self.init_params_ = {
            "encoder": encoder if isinstance(encoder, str) else None, "genes": list(genes),
            "layer": layer, "patch_um": float(patch_um), "patch_px": patch_px, "table_key": table_key,
            "library_key": library_key, "input_px": input_px, "n_hidden": int(n_hidden), "n_layers": int(n_layers),
            "dropout": float(dropout), "seed": int(seed), "encoder_kwargs": dict(encoder_kwargs or {}),
        }
        counts = target_counts(table, genes, layer)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self._build(encoder, pretrained, genes, gene_mean=counts.mean(0))
        self._attach(data, counts=counts)
        self.is_trained_ = False
        self.history_: pd.DataFrame | None = None
        self._pretrained = bool(pretrained)
        self._train_kwargs: dict[str, Any] = {}
        self.calibration_: ConformalCalibration | None = None
        logger.info("NBFinetuner: %s (%d features) → %d genes on %d spots, %g µm patches at %d px",
                    self.net.encoder.name, self.net.encoder.dim, len(self.genes_), table.n_obs, patch_um,
                    self.init_params_["patch_px"])

    def _build(self, encoder: Any, pretrained: bool, genes: list[str], gene_mean: np.ndarray | None) -> None:
        """Encoder and NB head from :attr:`init_params_` (no data needed: :meth:`load` uses it too)."""
        from ...encoders import get_encoder

        p = self.init_params_
        kw = dict(p["encoder_kwargs"])
        if not pretrained:
            kw.pop("weights", None)  # the saved state dict replaces any weights file
        enc = get_encoder(encoder, pretrained=pretrained, **kw)
        if p["input_px"] is not None:
            enc.input_px, enc.resize_px, enc._dim = int(p["input_px"]), None, None
        p["patch_px"] = int(p["patch_px"] or enc.input_px)
        head = NBModule(enc.dim, len(genes), n_hidden=p["n_hidden"], n_layers=p["n_layers"], dropout=p["dropout"],
                        gene_mean=gene_mean)
        self.net = FinetuneModule(enc, head)
        self.genes_ = list(genes)
        self.seed_ = int(p["seed"])

    def _attach(self, data: Any, counts: np.ndarray | None = None) -> None:
        """Patches and counts of the training data (``data=None``: a loaded model that only predicts)."""
        from ...pp import extract_patches

        self._patches = self._counts = self._table = self._data = None
        if data is None:
            return
        self._data = data  # for cross-conformal calibration folds
        p = self.init_params_
        table = get_table(data, p["table_key"])
        if counts is None:
            counts = target_counts(table, self.genes_, p["layer"])
        self._patches = extract_patches(data, patch_um=p["patch_um"], patch_px=p["patch_px"],
                                        table_key=p["table_key"], library_key=p["library_key"])
        self._counts, self._table = counts, table

    def __repr__(self) -> str:
        state = "trained" if self.is_trained_ else "untrained"
        return (f"NBFinetuner({self.net.encoder.name!r} → {len(self.genes_)} genes, "
                f"{self.init_params_['patch_um']:g} µm at {self.init_params_['patch_px']} px, {state})")

    # ------------------------------------------------------------------ training
    def _split(self, train_indices, validation_size: float, early_stopping: bool, seed: int):
        if self._patches is None:
            msg = ("This NBFinetuner was loaded without training data, so it can only predict; pass the data to "
                   "NBFinetuner.load(path, data) to train it further.")
            raise RuntimeError(msg)
        n = len(self._counts)
        rows = resolve_train_indices(self._table, train_indices)
        tr, val = split_train_validation(rows, validation_size, early_stopping, seed)
        # table rows → PatchDataset items
        item_of_row = np.empty(n, dtype=int)
        item_of_row[self._patches.obs_index] = np.arange(len(self._patches))
        return tr, val, item_of_row

    @torch.no_grad()
    def _init_feature_stats(self, items: np.ndarray, batch_size: int, device: torch.device, seed: int) -> None:
        """Standardise the head's input with the (pretrained) features of up to 256 training patches."""
        sel = np.random.default_rng(seed).permutation(items)[:_N_STATS]
        feats = self._features(PatchCounts(self._patches, None, np.sort(sel)), batch_size, device, 0, "features")
        head = self.net.head
        head.feature_mean.copy_(torch.from_numpy(feats.mean(0)))
        head.feature_std.copy_(torch.from_numpy(feats.std(0)).clamp_min(1e-6))

    @d.dedent
    def train(
        self,
        max_epochs: int | None = None,
        *,
        train_indices: Sequence[int] | np.ndarray | str | None = None,
        accelerator: str | None = None,
        devices: int | str | list[int] | None = None,
        seed: int | None = None,
        progress: bool | None = None,
        batch_size: int = 32,
        lr: float = 1e-3,
        backbone_lr: float = 1e-4,
        freeze_backbone_epochs: int = 0,
        validation_size: float = 0.1,
        precision: str | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int = 3,
        weight_decay: float = 1e-4,
        augment: bool = True,
        num_workers: int = 0,
        **trainer_kwargs: Any,
    ) -> None:
        """Fine-tune encoder and head by minimising the NB negative log-likelihood (Lightning, AdamW).

        Parameters
        ----------
        max_epochs
            Maximum number of epochs (``None``: 10).
        %(train_indices)s
            Spots outside it are never seen.
        %(accelerator)s
        %(devices)s
        seed
            Seed of the split, the minibatch order and the augmentation; ``None`` uses the model's
            ``seed`` (itself :attr:`stimg.settings.seed` by default).
        %(progress)s
        batch_size
            Patches per step.
        lr
            Learning rate of the NB head.
        backbone_lr
            Learning rate of the encoder (usually 10× smaller).
        freeze_backbone_epochs
            Warm-up epochs that train the head only (encoder weights and batch-norm statistics fixed).
        validation_size
            Fraction of the training spots held out (drawn with ``seed``) for early stopping.
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
        **trainer_kwargs
            Passed to :class:`lightning.pytorch.Trainer` (e.g. ``strategy='ddp'``).

        Examples
        --------
        >>> m.train(max_epochs=10, freeze_backbone_epochs=1, accelerator="auto")  # doctest: +SKIP
        >>> m.history_  # doctest: +SKIP
        """
        import lightning.pytorch as pl
        from lightning.pytorch.callbacks import EarlyStopping

        recorded = {"max_epochs": max_epochs, "accelerator": accelerator, "devices": devices, "seed": seed,
                    "batch_size": batch_size, "lr": lr, "backbone_lr": backbone_lr,
                    "freeze_backbone_epochs": freeze_backbone_epochs, "validation_size": validation_size,
                    "precision": precision, "early_stopping": early_stopping,
                    "early_stopping_patience": early_stopping_patience, "weight_decay": weight_decay,
                    "augment": augment, "num_workers": num_workers,
                    **{k: v for k, v in trainer_kwargs.items() if k != "callbacks"}}
        defaults = train_defaults(accelerator, devices, self.seed_ if seed is None else seed)
        seed, accelerator, devices = defaults.seed, defaults.accelerator, defaults.devices
        max_epochs = _DEFAULT_EPOCHS if max_epochs is None else int(max_epochs)
        tr, val, item_of_row = self._split(train_indices, validation_size, early_stopping, seed)
        acc, default_precision = _trainer_accelerator(accelerator)
        device = resolve_device(accelerator)
        if int(batch_size) < 1 or int(max_epochs) < 1:
            msg = f"batch_size and max_epochs must be ≥ 1, got {batch_size!r} and {max_epochs!r}."
            raise ValueError(msg)
        if freeze_backbone_epochs < 0:
            msg = f"freeze_backbone_epochs must be ≥ 0, got {freeze_backbone_epochs!r}."
            raise ValueError(msg)
        plan = FinetuneTrainingPlan(self.net, lr=lr, backbone_lr=backbone_lr, weight_decay=weight_decay,
                                    freeze_epochs=int(freeze_backbone_epochs), augment=augment)
        callbacks = list(trainer_kwargs.pop("callbacks", []))
        best = None
        if early_stopping:
            best = restore_best("val_nll")
            callbacks += [EarlyStopping(monitor="val_nll", patience=early_stopping_patience, mode="min"), best]
        trainer_kwargs.setdefault("enable_progress_bar", settings.progress if progress is None else progress)
        train_ds = PatchCounts(self._patches, self._counts, item_of_row[tr])
        gen = torch.Generator().manual_seed(seed)
        # a last batch of one patch breaks batch norm on 1×1 feature maps: drop it
        drop_last = len(train_ds) > batch_size and len(train_ds) % batch_size == 1
        loaders = {"train_dataloaders": DataLoader(
            train_ds, batch_size=batch_size, shuffle=True, num_workers=num_workers, collate_fn=PatchCounts.collate,
            generator=gen, drop_last=drop_last, persistent_workers=num_workers > 0)}
        if val.size:
            loaders["val_dataloaders"] = DataLoader(
                PatchCounts(self._patches, self._counts, item_of_row[val]), batch_size=batch_size,
                num_workers=num_workers, collate_fn=PatchCounts.collate)
        try:
            with quiet_lightning(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                trainer = pl.Trainer(
                    accelerator=acc, devices=devices, precision=precision or default_precision,
                    max_epochs=int(max_epochs), callbacks=callbacks, logger=False, enable_checkpointing=False,
                    enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, **trainer_kwargs,
                )
                torch.manual_seed(seed)
                if not self.is_trained_:
                    self._init_feature_stats(item_of_row[tr], batch_size, device, seed)
                trainer.fit(plan, **loaders)
        finally:
            self.net.cpu()
        self.net.eval()
        self._refresh_cache_key()
        self.history_ = pd.DataFrame(plan.history)
        self.train_indices_, self.validation_indices_ = tr, val
        self._train_kwargs = recorded
        self.calibration_ = None
        self.is_trained_ = True
        if best is not None and best.state is not None:
            logger.info("NBFinetuner: %d epochs, best validation NLL %.4g", len(plan.history), best.best)

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
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=PatchCounts.collate)
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
        vals = self._features(PatchCounts(ds, None, np.arange(len(ds))), batch_size, resolve_device(accelerator),
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
        check_trained(self)
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
        _check_scale(scale)
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
        _check_level(level)
        cal = resolve_calibrated(self, calibrated)
        r, b = self.get_nb_params(data, **kwargs)
        return _interval(r[None], b[None], level, cal)

    def _rows_nb_params(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """NB parameters of training-table rows, read from the training patches."""
        item_of_row = np.empty(len(self._counts), dtype=int)
        item_of_row[self._patches.obs_index] = np.arange(len(self._patches))
        kw = self._train_kwargs
        rb = self._features(PatchCounts(self._patches, None, item_of_row[rows]), int(kw.get("batch_size") or 32),
                            resolve_device(kw.get("accelerator")), 0, "nb")
        g = len(self.genes_)
        return rb[:, :g], rb[:, g:]

    def calibrate(self, groups: str | Sequence | np.ndarray | None = "library_id", *,
                  calibration_indices: Sequence[int] | np.ndarray | str | None = None, per_gene: bool = False,
                  progress: bool | None = None) -> NBFinetuner:
        """Conformally calibrate :meth:`predict_interval` (see :meth:`NBRegressor.calibrate <stimg.models.NBRegressor.calibrate>`).

        Split-conformal on ``calibration_indices`` (training-table spots held out of training) is
        cheap; cross-conformal over ``groups`` fine-tunes one encoder per training section. The
        calibration is saved with the model.

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
        check_trained(self, "calibrate")
        if self._patches is None or self.train_indices_ is None:
            msg = "calibration needs the training data; load the model with it: NBFinetuner.load(path, data)."
            raise RuntimeError(msg)
        val = self.validation_indices_ if self.validation_indices_ is not None else np.zeros(0, np.int64)
        used = np.sort(np.r_[self.train_indices_, val]).astype(np.int64)
        if calibration_indices is not None:
            held = resolve_train_indices(self._table, calibration_indices, name="calibration_indices")
            if (seen := np.intersect1d(held, used)).size:
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
        labels = training_groups(self._table, groups, used)

        def fit_params(fit, held):
            m = type(self)(self._data, pretrained=self._pretrained, target_key=None, **p)
            m.train(**{**self._train_kwargs, "train_indices": fit, "progress": False})
            return m._rows_nb_params(held)

        self.calibration_ = cross_conformal(fit_params, lambda rows: self._counts[rows], used, labels,
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
    def _get_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        header = {"init_params": self.init_params_, "encoder_name": self.net.encoder.name,
                  "history": None if self.history_ is None else self.history_.to_dict(orient="list"),
                  "train_kwargs": _jsonable(self._train_kwargs), "pretrained": self._pretrained}
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        _put_calibration(self.calibration_, header, tensors)
        for name in ("train_indices_", "validation_indices_"):
            if getattr(self, name, None) is not None:
                tensors[name] = np.asarray(getattr(self, name), dtype=np.int64)
        return header, tensors

    @classmethod
    def _from_state(cls, header: dict[str, Any], tensors: dict[str, Any], data: Any = None, *,
                    encoder: nn.Module | None = None) -> NBFinetuner:
        p = dict(header["init_params"])
        if p["encoder"] is None and encoder is None:
            msg = (f"This model was fine-tuned from a custom torch.nn.Module encoder ({header.get('encoder_name')!r}); "
                   "pass a module of the same architecture as encoder= (its weights are replaced by the saved ones).")
            raise ValueError(msg)
        obj = cls.__new__(cls)
        obj.init_params_ = p
        with torch.random.fork_rng():
            obj._build(encoder if p["encoder"] is None else p["encoder"], False, list(p["genes"]), None)
        obj.net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
        obj.net.eval()
        obj._refresh_cache_key()
        obj.is_trained_ = True
        obj._pretrained = bool(header.get("pretrained", True))
        obj._train_kwargs = dict(header.get("train_kwargs") or {})
        obj.calibration_ = _get_calibration(header, tensors)
        obj.history_ = None if header.get("history") is None else pd.DataFrame(header["history"])
        obj.train_indices_ = tensors["train_indices_"].numpy() if "train_indices_" in tensors else None
        obj.validation_indices_ = (tensors["validation_indices_"].numpy() if "validation_indices_" in tensors
                                   else None)
        obj._attach(data)
        return obj

    @classmethod
    def load(cls, path: str | os.PathLike, data: Any = None, *, encoder: nn.Module | None = None) -> NBFinetuner:
        """Load a model written by :meth:`save`; it predicts on any data with images.

        Parameters
        ----------
        path
            File written by :meth:`save`.
        data
            Optional training data (images and raw counts of the model's genes) to continue training.
        encoder
            For a model whose encoder was a :class:`torch.nn.Module`: a module of the same
            architecture (its weights are replaced by the saved ones).

        Examples
        --------
        >>> m = si.models.NBFinetuner.load("finetuned.stimg")  # doctest: +SKIP
        >>> m.predict(new_sdata)  # doctest: +SKIP
        """
        return super().load(path, data, encoder=encoder)
