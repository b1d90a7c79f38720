"""NBRegressor: scvi-tools model wrapping the negative-binomial head (STImage, DESIGN §4)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data.fields import NumericalObsField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from ..._constants import TARGET_KEY
from ..._prediction import ExpressionPrediction
from ..._settings import settings
from ..._utils import warn
from ..._validate import assert_key_in, check_indices, check_matrix, check_nonempty
from ._conformal import (
    ConformalCalibration,
    coverage_scores,
    cross_conformal,
    resolve_calibrated,
    training_groups,
)
from ._constants import COUNTS_OBSM, LOG_LIB_OBS, NB_KEYS
from ._module import NBModule, nb_log1p_moments, nb_mean_var, nb_mixture_quantiles

logger = logging.getLogger("stimg")


def _counts_source(adata: AnnData, layer: str | None):
    if layer is None:
        return adata.X
    assert_key_in(adata.layers, layer, where="adata.layers")
    return adata.layers[layer]


def _resolve_genes(adata: AnnData, target_key: str | None, genes: Sequence[str] | None, *,
                   require_key: bool = False) -> list[str]:
    """Target genes: ``genes``, else the boolean ``.var[target_key]``, else all genes.

    With ``require_key``, a ``target_key`` absent from ``.var`` raises instead of selecting all genes.
    """
    if genes is not None:
        genes = [str(g) for g in genes]
        check_nonempty(len(genes), "genes")
        missing = pd.Index(genes).difference(adata.var_names)
        if len(missing):
            msg = (f"{len(missing)} of {len(genes)} target genes are missing from var_names "
                   f"(e.g. {list(missing[:5])}; the table has e.g. {list(adata.var_names[:5])}).")
            raise KeyError(msg)
        return genes
    if target_key is None or (target_key not in adata.var and not require_key):
        return list(adata.var_names)
    assert_key_in(adata.var, target_key, where="table.var",
                  hint="Select target genes (si.pp.select_genes), pass genes=, or target_key=None for all genes.")
    mask = adata.var[target_key].to_numpy()
    if mask.dtype != bool:
        msg = f"table.var[{target_key!r}] must be a boolean gene mask, got dtype {mask.dtype}."
        raise TypeError(msg)
    check_nonempty(int(mask.sum()), f"table.var[{target_key!r}]", "select target genes first (si.pp.select_genes).")
    return list(adata.var_names[mask])


def _log_library(adata: AnnData, library_size: bool | str, layer: str | None) -> np.ndarray:
    """Log of the per-spot library size: total counts of ``layer`` (``True``) or an ``.obs`` column."""
    if isinstance(library_size, str):
        assert_key_in(adata.obs, library_size, where="adata.obs", hint="Pass a library size or size-factor column.")
        lib = adata.obs[library_size].to_numpy(dtype=np.float64)
    else:
        lib = np.asarray(_counts_source(adata, layer).sum(1)).ravel().astype(np.float64)
    if not np.all(np.isfinite(lib)) or np.any(lib <= 0):
        msg = "library sizes must be finite and > 0 for every spot; drop empty spots first."
        raise ValueError(msg)
    return np.log(lib)


class _RestoreBest:
    """Lightning callback: keep the module weights of the best validation epoch in memory, restore at the end."""

    def __new__(cls, monitor: str = "elbo_validation"):
        from lightning.pytorch.callbacks import Callback

        class _Cb(Callback):
            def __init__(self):
                self.best, self.state = float("inf"), None

            def on_validation_epoch_end(self, trainer, pl_module):
                val = trainer.callback_metrics.get(monitor)
                if val is not None and float(val) < self.best:
                    self.best = float(val)
                    self.state = {k: v.detach().clone() for k, v in pl_module.module.state_dict().items()}

            def on_train_end(self, trainer, pl_module):
                if self.state is not None:
                    pl_module.module.load_state_dict(self.state)

        return _Cb()


class NBRegressor(UnsupervisedTrainingMixin, BaseModelClass):
    """Per-gene negative-binomial regression from frozen image features (STImage).

    An MLP maps each spot's (standardised) embedding to NB parameters per target gene,
    ``r = softplus(·)`` and ``p = sigmoid(·)``; the NB mean is ``r(1−p)/p`` and the variance
    ``r(1−p)/p²``. Training minimises the NB negative log-likelihood of the raw counts, optionally
    with a library-size offset. Combine several seeds (or encoders) with
    :class:`~stimg.models.NBEnsemble` for epistemic uncertainty.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_hidden
        Hidden width of the MLP (``0``: linear head).
    n_layers
        Number of hidden layers.
    dropout
        Dropout rate.
    seed
        Seed of the weight initialisation (and default seed of :meth:`train`).

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(200, 20, image=False, as_anndata=True)
    >>> si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
    >>> model = si.models.NBRegressor(adata)
    >>> model.train(max_epochs=5, accelerator="cpu")  # doctest: +SKIP
    >>> si.tl.predict_expression(adata, model)  # doctest: +SKIP
    """

    _module_cls = NBModule

    def __init__(self, adata: AnnData, *, n_hidden: int = 256, n_layers: int = 1, dropout: float = 0.1,
                 seed: int = 0):
        super().__init__(adata)
        args = self.adata_manager.registry["setup_args"]
        emb = np.asarray(self.adata_manager.get_from_registry(NB_KEYS.EMB), dtype=np.float64)
        counts = np.asarray(self.adata_manager.get_from_registry(NB_KEYS.COUNTS), dtype=np.float64)
        use_library = bool(args.get("library_size"))
        log_ref = 0.0
        if use_library:
            log_lib = np.asarray(self.adata_manager.get_from_registry(NB_KEYS.LOG_LIB)).ravel()
            log_ref = float(np.mean(log_lib))
        self.genes_ = list(args["genes"])
        self.seed_ = int(seed)
        self.calibration_: ConformalCalibration | None = None
        self._train_kwargs: dict[str, Any] = {}
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.module = NBModule(
                emb.shape[1], counts.shape[1], n_hidden=n_hidden, n_layers=n_layers, dropout=dropout,
                use_library=use_library, feature_mean=emb.mean(0), feature_std=emb.std(0),
                gene_mean=counts.mean(0), log_library_ref=log_ref,
            )
        self._model_summary_string = (f"NBRegressor: {emb.shape[1]} features → {counts.shape[1]} genes, "
                                      f"n_hidden={n_hidden}, n_layers={n_layers}, library offset={use_library}")
        self.init_params_ = self._get_init_params(locals())

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        embedding_key: str,
        layer: str | None = None,
        *,
        target_key: str | None = TARGET_KEY,
        genes: Sequence[str] | None = None,
        library_size: bool | str = False,
        **kwargs: Any,
    ) -> None:
        """Register an embedding and raw counts of the target genes.

        Writes ``adata.obsm['_si_nb_counts']`` (dense counts of the target genes) and, with
        ``library_size``, ``adata.obs['_si_nb_log_library']``; the table keeps all its genes.

        Parameters
        ----------
        adata
            Table with spots in rows.
        embedding_key
            ``.obsm`` key of the image features (e.g. ``'X_efficientnet_lite0'``).
        layer
            Layer with raw counts; ``None`` uses ``X``.
        target_key
            Boolean ``.var`` column of target genes; used when present, otherwise all genes.
        genes
            Explicit target genes (overrides ``target_key``).
        library_size
            ``False``: no offset (the model predicts counts from the image alone). ``True``: offset
            by the log of each spot's total counts in ``layer`` over all genes. A string: an
            ``.obs`` column with library sizes or size factors.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields` (used by ``load``).

        Examples
        --------
        >>> import stimg as si
        >>> adata = si.datasets.synthetic(50, 10, image=False, as_anndata=True)
        >>> si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
        """
        assert_key_in(adata.obsm, embedding_key, where="adata.obsm",
                      hint="Compute image features first, e.g. with si.pp.embed.")
        check_matrix(adata.obsm[embedding_key], f"adata.obsm[{embedding_key!r}]", n_obs=adata.n_obs)
        genes = _resolve_genes(adata, target_key, genes)
        src = _counts_source(adata, layer)
        idx = adata.var_names.get_indexer(genes)
        y = check_matrix(src[:, idx], "target counts", n_obs=adata.n_obs).astype(np.float32)
        if (y < 0).any():
            msg = "counts must be non-negative; pass the raw-count layer with layer=."
            raise ValueError(msg)
        if not np.allclose(y, np.round(y)):
            warn("target counts are not integers; the NB likelihood expects raw counts (pass layer=).")
        log_lib = _log_library(adata, library_size, layer) if library_size else None
        args = cls._get_setup_method_args(cls=cls, adata=adata, embedding_key=embedding_key, layer=layer,
                                          target_key=target_key, genes=genes, library_size=library_size)
        adata.obsm[COUNTS_OBSM] = y
        fields = [ObsmField(NB_KEYS.EMB, embedding_key), ObsmField(NB_KEYS.COUNTS, COUNTS_OBSM)]
        if log_lib is not None:
            adata.obs[LOG_LIB_OBS] = log_lib
            fields.append(NumericalObsField(NB_KEYS.LOG_LIB, LOG_LIB_OBS))
        mgr = AnnDataManager(fields=fields, setup_method_args=args)
        scvi_logger = logging.getLogger("scvi")
        old = scvi_logger.level
        scvi_logger.setLevel(logging.WARNING)  # "Generating sequential column names" for obsm fields
        try:
            mgr.register_fields(adata, **kwargs)
        finally:
            scvi_logger.setLevel(old)
        cls.register_manager(mgr)

    def train(
        self,
        max_epochs: int = 300,
        *,
        accelerator: str | None = None,
        devices: int | str = "auto",
        train_indices: Sequence[int] | np.ndarray | None = None,
        validation_size: float = 0.1,
        early_stopping: bool = True,
        early_stopping_patience: int = 10,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        seed: int | None = None,
        progress: bool | None = None,
        plan_kwargs: dict | None = None,
        **trainer_kwargs: Any,
    ):
        """Fit by minimising the NB negative log-likelihood with Adam (scvi-tools training loop).

        Parameters
        ----------
        max_epochs
            Maximum number of epochs.
        accelerator
            ``"cpu"``, ``"gpu"``, ``"auto"``; ``None`` uses :attr:`stimg.settings.accelerator`.
        devices
            Lightning devices.
        train_indices
            Rows (integer positions or a boolean mask) to train on; the rest is never seen.
            ``None`` uses all spots.
        validation_size
            Fraction of the training rows held out for early stopping (drawn with ``seed``).
        early_stopping
            Stop when the validation NLL has not improved for ``early_stopping_patience`` epochs,
            and restore the weights of the best validation epoch.
        early_stopping_patience
            Patience in epochs.
        batch_size
            Minibatch size.
        lr
            Learning rate.
        weight_decay
            L2 penalty.
        seed
            Seed of the split and minibatch order; ``None`` uses the model's ``seed``.
        progress
            Show the epoch progress bar; ``None`` uses :attr:`stimg.settings.progress`.
        plan_kwargs
            Extra :class:`scvi.train.TrainingPlan` arguments.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer`.

        Examples
        --------
        >>> model.train(max_epochs=100, accelerator="cpu", train_indices=idx)  # doctest: +SKIP
        """
        recorded = {"max_epochs": max_epochs, "accelerator": accelerator, "devices": devices,
                    "validation_size": validation_size, "early_stopping": early_stopping,
                    "early_stopping_patience": early_stopping_patience, "batch_size": batch_size, "lr": lr,
                    "weight_decay": weight_decay, "plan_kwargs": plan_kwargs,
                    **{k: v for k, v in trainer_kwargs.items() if k != "callbacks"}}
        n = self.adata.n_obs
        tr = check_indices(train_indices, n)
        check_nonempty(tr.size, "train_indices")
        seed = self.seed_ if seed is None else int(seed)
        gen = np.random.default_rng(seed)
        tr = gen.permutation(np.unique(tr))
        n_val = int(round(validation_size * tr.size)) if (early_stopping or validation_size > 0) else 0
        if early_stopping:
            n_val = max(1, n_val)
        if n_val >= tr.size:
            msg = f"validation_size={validation_size} leaves no training spots out of {tr.size}."
            raise ValueError(msg)
        val, tr = np.sort(tr[:n_val]), np.sort(tr[n_val:])
        rest = np.setdiff1d(np.arange(n), np.r_[tr, val])
        pk = {"lr": lr, "weight_decay": weight_decay, "optimizer": "AdamW", **(plan_kwargs or {})}
        trainer_kwargs.setdefault("enable_progress_bar", settings.progress if progress is None else progress)
        trainer_kwargs.setdefault("enable_model_summary", False)
        trainer_kwargs.setdefault("log_every_n_steps", 1)
        if early_stopping:  # Lightning's EarlyStopping: scvi's prints its reason to stdout on teardown
            from lightning.pytorch.callbacks import EarlyStopping

            stop = EarlyStopping(monitor="elbo_validation", patience=early_stopping_patience, mode="min")
            trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), stop, _RestoreBest()]
        if n_val:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
        old_levels = [lg.level for lg in quiet]
        for lg in quiet:  # "GPU available", "Seed set to", tips
            lg.setLevel(logging.WARNING)
        try:
            with torch.random.fork_rng(), warnings.catch_warnings():
                # Lightning's own use of torch's deprecated pytree LeafSpec: not actionable by users
                warnings.filterwarnings("ignore", message=".*treespec.*")
                # scvi's note on a small last minibatch: harmless here (LayerNorm, no BatchNorm)
                warnings.filterwarnings("ignore", message=".*Last batch will have a small size.*")
                torch.manual_seed(seed)
                super().train(
                    max_epochs=max_epochs, accelerator=accelerator or settings.accelerator, devices=devices,
                    batch_size=batch_size, early_stopping=False, plan_kwargs=pk,
                    datasplitter_kwargs={"external_indexing": [tr, val, rest]}, **trainer_kwargs,
                )
        finally:
            for lg, lv in zip(quiet, old_levels, strict=True):
                lg.setLevel(lv)
        self.train_indices_ = tr
        self.validation_indices_ = val
        self._train_kwargs = recorded
        self.calibration_ = None  # a retrained model must be calibrated again

    # ------------------------------------------------------------------ conformal calibration
    def _untrained_copy(self) -> NBRegressor:
        """A fresh model with this one's data registration and hyperparameters."""
        args = dict(self.adata_manager.registry["setup_args"])
        current = self._get_most_recent_anndata_manager(self.adata, required=True).registry["setup_args"]
        if dict(current) == args:
            return type(self)(self.adata, **self.init_params_["non_kwargs"])
        type(self).setup_anndata(self.adata, **args)  # members of multi-encoder ensembles
        try:
            return type(self)(self.adata, **self.init_params_["non_kwargs"])
        finally:
            type(self).setup_anndata(self.adata, **dict(current))

    def _fit_fold(self, rows: np.ndarray) -> NBRegressor:
        m = self._untrained_copy()
        m.train(**{**self._train_kwargs, "train_indices": rows, "progress": False})
        return m

    def _observed_counts(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.adata_manager.get_from_registry(NB_KEYS.COUNTS), dtype=np.float64)[rows]

    def calibrate(self, groups: str | Sequence | np.ndarray | None = "library_id", *,
                  calibration_indices: Sequence[int] | np.ndarray | None = None, per_gene: bool = False,
                  progress: bool | None = None) -> NBRegressor:
        """Conformally calibrate :meth:`predict_interval` so that level-τ intervals cover τ of new counts.

        **Cross-conformal** (default, ``groups``): each training section is predicted by a model
        trained, with this model's settings, on the other training sections; the score of each
        count is the smallest central level of its NB interval that covers it, and the level used
        for a nominal τ is the conformal ``⌈(n+1)τ⌉/n`` quantile of these scores (pooled over genes, or
        per gene).
        Costs one extra training per section. **Split-conformal** (``calibration_indices``): spots
        held out of training are scored by this model (no retraining).

        Parameters
        ----------
        groups
            ``.obs`` column (or one label per spot) of the sections to leave out in turn; only the
            training spots are used.
        calibration_indices
            Spots not used in training (positions or a boolean mask): split-conformal instead.
        per_gene
            One calibrated level per gene instead of one level shared by all genes (the default, which
            held nominal coverage across patients in benchmarks/conformal_her2st.py).
        progress
            Progress bar over the folds.

        Returns
        -------
        The model, with ``calibration_`` set (saved with it).

        Examples
        --------
        >>> model.train(train_indices=train)  # doctest: +SKIP
        >>> model.calibrate("library_id")  # doctest: +SKIP
        >>> lo, hi = model.predict_interval(new, level=0.9)  # calibrated  # doctest: +SKIP
        """
        if not getattr(self, "is_trained_", False):
            msg = "train the model before calibrating it."
            raise RuntimeError(msg)
        if calibration_indices is not None:
            held = check_indices(calibration_indices, self.adata.n_obs, "calibration_indices")
            seen = np.intersect1d(held, np.r_[self.train_indices_, self.validation_indices_])
            if seen.size:
                msg = (f"{seen.size} calibration spots were used in training; pass spots held out of training "
                       "(train with train_indices= excluding them).")
                raise ValueError(msg)
            r, b = self.get_nb_params(self.adata[held])
            scores = coverage_scores(r, b, self._observed_counts(held))
            self.calibration_ = ConformalCalibration.from_scores(scores, method="split", per_gene=per_gene)
            return self
        rows = np.sort(np.r_[self.train_indices_, self.validation_indices_])
        labels = training_groups(self.adata, groups, rows)

        def fit_params(fit, held):
            return self._fit_fold(fit).get_nb_params(self.adata[held])

        self.calibration_ = cross_conformal(fit_params, self._observed_counts, rows, labels, per_gene=per_gene,
                                            progress=progress)
        return self

    # ------------------------------------------------------------------ inference
    def _embedding_and_library(self, adata: AnnData, library_size: str) -> tuple[np.ndarray, np.ndarray | None]:
        args = self.adata_manager.registry["setup_args"]
        key = args["embedding_key"]
        assert_key_in(adata.obsm, key, where="adata.obsm", hint="Embed the new table with the same encoder.")
        emb = check_matrix(adata.obsm[key], f"adata.obsm[{key!r}]", n_obs=adata.n_obs,
                           n_cols=int(self.module.feature_mean.shape[0])).astype(np.float32)
        lib = None
        if self.module.use_library:
            if library_size == "observed":
                lib = _log_library(adata, args["library_size"], args["layer"]).astype(np.float32)
            elif library_size != "reference":
                msg = f"library_size must be 'observed' or 'reference', got {library_size!r}."
                raise ValueError(msg)
        return emb, lib

    @torch.inference_mode()
    def get_nb_params(self, adata: AnnData | None = None, *, batch_size: int = 1024,
                      library_size: str = "observed") -> tuple[np.ndarray, np.ndarray]:
        """NB ``r`` and success logits (``p = sigmoid(logits)``), each ``(n_obs, n_genes)``.

        Parameters
        ----------
        adata
            Any table with the model's embedding in ``.obsm`` (its genes do not matter); ``None``
            uses the training table.
        batch_size
            Spots per forward pass.
        library_size
            With a library-size offset: ``'observed'`` reads it from ``adata`` as registered,
            ``'reference'`` uses the training mean (for tables without counts).

        Examples
        --------
        >>> r, logits = model.get_nb_params(adata)  # doctest: +SKIP
        """
        adata = self.adata if adata is None else adata
        emb, lib = self._embedding_and_library(adata, library_size)
        self.module.eval()
        rs, bs = [], []
        for i in range(0, emb.shape[0], batch_size):
            lb = None if lib is None else torch.from_numpy(lib[i:i + batch_size])
            o = self.module.inference(torch.from_numpy(emb[i:i + batch_size]), lb)
            rs.append(o["r"].double().cpu())
            bs.append(o["logits"].double().cpu())
        return torch.cat(rs).numpy(), torch.cat(bs).numpy()

    def get_mean_variance(self, adata: AnnData | None = None, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """NB mean ``r(1−p)/p`` and variance ``r(1−p)/p²`` on the count scale, each ``(n_obs, n_genes)``.

        Parameters
        ----------
        adata
            Table with the embedding (``None``: training table).
        **kwargs
            Passed to :meth:`get_nb_params`.

        Examples
        --------
        >>> mean, var = model.get_mean_variance(adata)  # doctest: +SKIP
        """
        r, b = self.get_nb_params(adata, **kwargs)
        m, v = nb_mean_var(torch.from_numpy(r), torch.from_numpy(b))
        return m.numpy(), v.numpy()

    def predict(self, adata: AnnData | None = None, *, scale: str = "log1p", **kwargs: Any) -> ExpressionPrediction:
        """Predicted expression and aleatoric variance per spot and gene.

        ``scale='log1p'`` (the evaluation scale): the mean is ``E[log1p Y]`` and the aleatoric
        variance ``Var[log1p Y]`` under the predicted NB, both computed exactly by summing the NB
        pmf over counts ``0 … mean + 10 sd`` (no delta method, no sampling). ``scale='counts'``:
        the NB mean and variance.

        Parameters
        ----------
        adata
            Table with the embedding; it may hold any genes (``None``: training table).
        scale
            ``'log1p'`` or ``'counts'``.
        **kwargs
            Passed to :meth:`get_nb_params`.

        Returns
        -------
        :class:`~stimg.tl.ExpressionPrediction` over the model's genes, ``epistemic=None``.

        Examples
        --------
        >>> pred = model.predict(adata)  # doctest: +SKIP
        """
        r, b = self.get_nb_params(adata, **kwargs)
        mean, var = _moments(r, b, scale)
        return ExpressionPrediction(mean=mean, var_names=list(self.genes_), scale=scale, aleatoric=var)

    def predict_interval(self, adata: AnnData | None = None, *, level: float = 0.9, calibrated: bool | None = None,
                         **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Central predictive interval of the counts that should hold a fraction ``level`` of them.

        Uncalibrated: the NB quantiles ``(1 ± level)/2``. Calibrated (after :meth:`calibrate`):
        the NB quantiles of the conformally calibrated level of each gene.

        Parameters
        ----------
        adata
            Table with the embedding (``None``: training table).
        level
            Nominal coverage in (0, 1).
        calibrated
            ``None``: calibrated when the model has been calibrated; ``True``: require it;
            ``False``: the raw NB interval.
        **kwargs
            Passed to :meth:`get_nb_params`.

        Returns
        -------
        ``(lower, upper)`` counts, each ``(n_obs, n_genes)``.

        Examples
        --------
        >>> lo, hi = model.predict_interval(adata, level=0.9)  # doctest: +SKIP
        """
        cal = resolve_calibrated(self, calibrated)
        r, b = self.get_nb_params(adata, **kwargs)
        return _interval(r[None], b[None], level, cal)


def _moments(r: np.ndarray, b: np.ndarray, scale: str) -> tuple[np.ndarray, np.ndarray]:
    if scale == "log1p":
        return nb_log1p_moments(r, b)
    if scale == "counts":
        m, v = nb_mean_var(torch.from_numpy(r), torch.from_numpy(b))
        return m.numpy(), v.numpy()
    msg = f"scale must be 'log1p' or 'counts', got {scale!r}."
    raise ValueError(msg)


def _interval(r: np.ndarray, b: np.ndarray, level: float,
              calibration: ConformalCalibration | None = None) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < level < 1:
        msg = f"level must be in (0, 1), got {level!r}."
        raise ValueError(msg)
    lv = level if calibration is None else calibration.levels(level, r.shape[-1])
    if np.ndim(lv) and len(lv) != r.shape[-1]:
        msg = f"the calibration has {len(lv)} genes but the model predicts {r.shape[-1]}."
        raise ValueError(msg)
    lo, hi = nb_mixture_quantiles(r, b, ((1 - lv) / 2, (1 + lv) / 2))
    return lo, hi
