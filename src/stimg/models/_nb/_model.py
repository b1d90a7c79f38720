"""NBRegressor: scvi-tools model wrapping the negative-binomial head (STImage, DESIGN §4)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import uuid4

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data.fields import NumericalObsField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from ..._constants import TARGET_KEY
from ..._docs import d
from ..._prediction import ExpressionPrediction
from ..._settings import settings
from ..._validate import assert_key_in, check_matrix
from .._base import (
    FEATURE_SCALES,
    ModelIO,
    check_embedding,
    check_standardize,
    check_trained,
    embedding_provenance,
    resolve_train_indices,
    train_defaults,
)
from ._conformal import (
    ConformalCalibration,
    coverage_scores,
    cross_conformal,
    resolve_calibrated,
    training_groups,
)
from ._constants import COUNTS_OBSM, LOG_LIB_OBS, NB_KEYS
from ._data import log_library, resolve_genes, target_counts
from ._module import NBModule, nb_log1p_moments_fast, nb_mean_var, nb_mixture_quantiles
from ._training import quiet_lightning, register_quietly, restore_best, split_train_validation

logger = logging.getLogger("stimg")
_DEFAULT_EPOCHS = 300

# input scaling of the features (centred per feature, then divided by these scales)
def _history_to_json(history: dict[str, pd.DataFrame] | None) -> dict[str, Any] | None:
    if not history:
        return None
    return {k: {"index": [float(i) for i in v.index], "values": v.iloc[:, 0].astype(float).tolist()}
            for k, v in history.items()}


def _history_from_json(h: dict[str, Any] | None) -> dict[str, pd.DataFrame] | None:
    if not h:
        return None
    return {k: pd.DataFrame({k: v["values"]}, index=pd.Index(v["index"], name="epoch")) for k, v in h.items()}


class NBRegressor(ModelIO, UnsupervisedTrainingMixin, BaseModelClass):
    """Per-gene negative-binomial regression from frozen image features (STImage).

    An MLP maps each spot's (standardised) embedding to NB parameters per target gene,
    ``r = softplus(·)`` and ``p = sigmoid(·)``; the NB mean is ``r(1−p)/p`` and the variance
    ``r(1−p)/p²``. Training minimises the NB negative log-likelihood of the raw counts, optionally
    with a library-size offset. Combine several seeds (or encoders) with
    :class:`~stimg.models.NBEnsemble` for epistemic uncertainty.

    A saved model (:meth:`save`, one safetensors file) carries its genes, setup arguments and the
    provenance of its features (encoder, patch µm/px), so ``NBRegressor.load(path)`` predicts on
    any table holding the same embedding, without the training data.

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
        Seed of the weight initialisation and default seed of :meth:`train`; ``None`` uses
        :attr:`stimg.settings.seed`.
    standardize
        Input scaling after centring each feature on the training table: ``'isotropic'`` divides
        every feature by one scale (the mean per-feature SD), ``'per_feature'`` z-scores each
        feature. Isotropic is the default: z-scoring inflates low-variance features such as the
        neighbourhood means of :func:`stimg.pp.spatial_context`, and with them any shift of a new
        section, which made the NB ensemble lose with context on HER2ST
        (``benchmarks/bench_context_her2st.py``).

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(200, 20, image=False, as_anndata=True)
    >>> si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
    >>> model = si.models.NBRegressor(adata)
    >>> model.train(max_epochs=5, accelerator="cpu")  # doctest: +SKIP
    >>> si.tl.predict_expression(adata, model)  # doctest: +SKIP
    >>> model.save("nb.stimg")  # doctest: +SKIP
    >>> si.models.NBRegressor.load("nb.stimg").predict(new_adata)  # doctest: +SKIP
    """

    _module_cls = NBModule

    def __init__(self, adata: AnnData, *, n_hidden: int = 256, n_layers: int = 1, dropout: float = 0.1,
                 seed: int | None = None, standardize: str = "isotropic"):
        check_standardize(standardize)
        super().__init__(adata)
        args = self.adata_manager.registry["setup_args"]
        emb = np.asarray(self.adata_manager.get_from_registry(NB_KEYS.EMB), dtype=np.float64)
        counts = np.asarray(self.adata_manager.get_from_registry(NB_KEYS.COUNTS), dtype=np.float64)
        use_library = bool(args.get("library_size"))
        log_ref = 0.0
        if use_library:
            log_lib = np.asarray(self.adata_manager.get_from_registry(NB_KEYS.LOG_LIB)).ravel()
            log_ref = float(np.mean(log_lib))
        seed = train_defaults(seed=seed).seed
        self.genes_ = list(args["genes"])
        self.seed_ = int(seed)
        self.setup_args_ = {k: args[k] for k in ("embedding_key", "layer", "target_key", "genes", "library_size")}
        self.embedding_provenance_ = embedding_provenance(adata, args["embedding_key"])
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.module = NBModule(
                emb.shape[1], counts.shape[1], n_hidden=n_hidden, n_layers=n_layers, dropout=dropout,
                use_library=use_library, feature_mean=emb.mean(0), feature_std=FEATURE_SCALES[standardize](emb),
                gene_mean=counts.mean(0), log_library_ref=log_ref,
            )
        self._set_summary(emb.shape[1], counts.shape[1], n_hidden, n_layers, use_library)
        self.init_params_ = self._get_init_params(locals())
        self._hparams = {"n_hidden": int(n_hidden), "n_layers": int(n_layers), "dropout": float(dropout)}
        self.standardize_ = standardize
        self.calibration_: ConformalCalibration | None = None
        self._train_kwargs: dict[str, Any] = {}

    def _set_summary(self, n_in: int, n_genes: int, n_hidden: int, n_layers: int, use_library: bool) -> None:
        self._model_summary_string = (f"NBRegressor: {n_in} features → {n_genes} genes, "
                                      f"n_hidden={n_hidden}, n_layers={n_layers}, library offset={use_library}")

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
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Examples
        --------
        >>> import stimg as si
        >>> adata = si.datasets.synthetic(50, 10, image=False, as_anndata=True)
        >>> si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
        """
        if adata.n_obs == 0:
            msg = "adata has no spots (n_obs == 0); register a table with at least one spot."
            raise ValueError(msg)
        assert_key_in(adata.obsm, embedding_key, where="adata.obsm",
                      hint="Compute image features first, e.g. with si.pp.embed.")
        check_matrix(adata.obsm[embedding_key], f"adata.obsm[{embedding_key!r}]", n_obs=adata.n_obs)
        genes = resolve_genes(adata, target_key, genes)
        y = target_counts(adata, genes, layer)
        log_lib = log_library(adata, library_size, layer) if library_size else None
        args = cls._get_setup_method_args(cls=cls, adata=adata, embedding_key=embedding_key, layer=layer,
                                          target_key=target_key, genes=genes, library_size=library_size)
        adata.obsm[COUNTS_OBSM] = y
        fields = [ObsmField(NB_KEYS.EMB, embedding_key), ObsmField(NB_KEYS.COUNTS, COUNTS_OBSM)]
        if log_lib is not None:
            adata.obs[LOG_LIB_OBS] = log_lib
            fields.append(NumericalObsField(NB_KEYS.LOG_LIB, LOG_LIB_OBS))
        mgr = AnnDataManager(fields=fields, setup_method_args=args)
        register_quietly(mgr, adata, **kwargs)
        cls.register_manager(mgr)

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
        validation_size: float = 0.1,
        early_stopping: bool = True,
        early_stopping_patience: int = 10,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        plan_kwargs: dict | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        """Fit by minimising the NB negative log-likelihood with AdamW (scvi-tools training loop).

        Parameters
        ----------
        max_epochs
            Maximum number of epochs (``None``: 300).
        %(train_indices)s
            Spots outside it are never seen.
        %(accelerator)s
        %(devices)s
        seed
            Seed of the validation split and minibatch order; ``None`` uses the model's ``seed``
            (itself :attr:`stimg.settings.seed` by default).
        %(progress)s
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
        plan_kwargs
            Extra :class:`scvi.train.TrainingPlan` arguments.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (Lightning), e.g. ``strategy='ddp'`` with several
            ``devices``.

        Examples
        --------
        >>> model.train(max_epochs=100, accelerator="cpu", train_indices="si_sampled")  # doctest: +SKIP
        """
        if self.adata_manager is None:
            msg = ("This NBRegressor was loaded without a table holding counts of its genes, so it can only "
                   "predict; pass the training table to NBRegressor.load(path, adata) to train it further.")
            raise RuntimeError(msg)
        recorded = {"max_epochs": max_epochs, "accelerator": accelerator, "devices": devices, "seed": seed,
                    "validation_size": validation_size, "early_stopping": early_stopping,
                    "early_stopping_patience": early_stopping_patience, "batch_size": batch_size, "lr": lr,
                    "weight_decay": weight_decay, "plan_kwargs": plan_kwargs,
                    **{k: v for k, v in trainer_kwargs.items() if k != "callbacks"}}
        defaults = train_defaults(accelerator, devices, self.seed_ if seed is None else seed)
        max_epochs = _DEFAULT_EPOCHS if max_epochs is None else int(max_epochs)
        if max_epochs < 1 or int(batch_size) < 1:
            msg = f"max_epochs and batch_size must be ≥ 1, got {max_epochs!r} and {batch_size!r}."
            raise ValueError(msg)
        n = self.adata.n_obs
        rows = resolve_train_indices(self.adata, train_indices)
        tr, val = split_train_validation(rows, validation_size, early_stopping, defaults.seed)
        rest = np.setdiff1d(np.arange(n), np.r_[tr, val])
        pk = {"lr": lr, "weight_decay": weight_decay, "optimizer": "AdamW", **(plan_kwargs or {})}
        trainer_kwargs.setdefault("enable_progress_bar", settings.progress if progress is None else progress)
        trainer_kwargs.setdefault("enable_model_summary", False)
        trainer_kwargs.setdefault("log_every_n_steps", 1)
        if early_stopping:  # Lightning's EarlyStopping: scvi's prints its reason to stdout on teardown
            from lightning.pytorch.callbacks import EarlyStopping

            stop = EarlyStopping(monitor="elbo_validation", patience=early_stopping_patience, mode="min")
            trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), stop, restore_best("elbo_validation")]
        if val.size:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        from contextlib import nullcontext

        from ..._utils import resolve_device, torch_threads

        small = torch_threads(len(tr)) if resolve_device(defaults.accelerator).type == "cpu" else nullcontext()
        with quiet_lightning(), torch.random.fork_rng(), small:
            torch.manual_seed(defaults.seed)
            super().train(
                max_epochs=max_epochs, accelerator=defaults.accelerator, devices=defaults.devices,
                batch_size=batch_size, early_stopping=False, plan_kwargs=pk,
                datasplitter_kwargs={"external_indexing": [tr, val, rest]}, **trainer_kwargs,
            )
        self.train_indices_ = tr
        self.validation_indices_ = val
        self._train_kwargs = recorded
        self.calibration_ = None  # a retrained model must be calibrated again

    # ------------------------------------------------------------------ conformal calibration
    def _untrained_copy(self) -> NBRegressor:
        """A fresh model with this one's data registration and hyperparameters."""
        if self.adata_manager is None:
            msg = ("cross-conformal calibration retrains the model on the training table; load the model with it "
                   "(NBRegressor.load(path, adata)) or pass calibration_indices= for split-conformal calibration.")
            raise RuntimeError(msg)
        args = dict(self.adata_manager.registry["setup_args"])
        current = dict(self._get_most_recent_anndata_manager(self.adata, required=True).registry["setup_args"])
        if current == args:
            return type(self)(self.adata, **self._hparams, seed=self.seed_)
        type(self).setup_anndata(self.adata, **args)  # members of multi-encoder ensembles
        try:
            return type(self)(self.adata, **self._hparams, seed=self.seed_)
        finally:
            type(self).setup_anndata(self.adata, **current)

    def _fit_fold(self, rows: np.ndarray) -> NBRegressor:
        m = self._untrained_copy()
        m.train(**{**self._train_kwargs, "train_indices": rows, "progress": False})
        return m

    def _observed_counts(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.adata_manager.get_from_registry(NB_KEYS.COUNTS), dtype=np.float64)[rows]

    def _used_rows(self) -> np.ndarray:
        if self.train_indices_ is None:
            msg = "the model records no training spots; calibrate a model trained in this session or saved after it."
            raise RuntimeError(msg)
        val = self.validation_indices_ if self.validation_indices_ is not None else np.zeros(0, np.int64)
        return np.sort(np.r_[self.train_indices_, val]).astype(np.int64)

    def calibrate(self, groups: str | Sequence | np.ndarray | None = "library_id", *,
                  calibration_indices: Sequence[int] | np.ndarray | str | None = None, per_gene: bool = False,
                  progress: bool | None = None) -> NBRegressor:
        """Conformally calibrate :meth:`predict_interval` so that level-τ intervals hold τ of new counts.

        **Cross-conformal** (default, ``groups``): each training section is predicted by a model
        trained with this model's settings on the other training sections; the score of each
        count is the smallest central level of its NB interval that covers it, and the level used
        for a nominal τ is the conformal ``⌈(n+1)τ⌉/n`` quantile of these scores (pooled over genes, or
        per gene). Costs one extra training per section. **Split-conformal**
        (``calibration_indices``): spots held out of training are scored by this model (no
        retraining). The calibration is saved with the model.

        Parameters
        ----------
        groups
            ``.obs`` column (or one label per spot) of the sections to leave out in turn; only the
            training spots are used.
        calibration_indices
            Spots not used in training (positions, a boolean mask or a boolean ``.obs`` column):
            split-conformal instead.
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
        >>> model.train(train_indices=train)  # doctest: +SKIP
        >>> model.calibrate("library_id")  # doctest: +SKIP
        >>> lo, hi = model.predict_interval(new, level=0.9)  # calibrated  # doctest: +SKIP
        """
        check_trained(self, "calibrate")
        if self.adata_manager is None:
            msg = "calibration needs the training table; load the model with it: NBRegressor.load(path, adata)."
            raise RuntimeError(msg)
        if calibration_indices is not None:
            held = resolve_train_indices(self.adata, calibration_indices, name="calibration_indices")
            if (seen := np.intersect1d(held, self._used_rows())).size:
                msg = (f"{seen.size} calibration spots were used in training; pass spots held out of training "
                       "(train with train_indices= excluding them).")
                raise ValueError(msg)
            r, b = self.get_nb_params(self.adata[held])
            scores = coverage_scores(r, b, self._observed_counts(held))
            self.calibration_ = ConformalCalibration.from_scores(scores, method="split", per_gene=per_gene)
            return self
        rows = self._used_rows()
        labels = training_groups(self.adata, groups, rows)

        def fit_params(fit, held):
            return self._fit_fold(fit).get_nb_params(self.adata[held])

        self.calibration_ = cross_conformal(fit_params, self._observed_counts, rows, labels, per_gene=per_gene,
                                            progress=progress)
        return self

    # ------------------------------------------------------------------ persistence
    def _get_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        header = {
            "hparams": self._hparams, "seed": self.seed_, "setup_args": self.setup_args_, "genes": list(self.genes_),
            "n_input": int(self.module.feature_mean.shape[0]), "n_genes": int(self.module.n_genes),
            "use_library": bool(self.module.use_library), "embedding": self.embedding_provenance_,
            "history": _history_to_json(self.history_), "standardize": self.standardize_,
            "train_kwargs": _jsonable(self._train_kwargs),
        }
        tensors = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        _put_calibration(self.calibration_, header, tensors)
        for name in ("train_indices_", "validation_indices_"):
            if getattr(self, name, None) is not None:
                tensors[name] = np.asarray(getattr(self, name), dtype=np.int64)
        return header, tensors

    @classmethod
    def _from_state(cls, header: dict[str, Any], tensors: dict[str, Any], adata: AnnData | None = None,
                    **kwargs: Any) -> NBRegressor:
        if kwargs:
            msg = f"NBRegressor.load got unexpected arguments {sorted(kwargs)}."
            raise TypeError(msg)
        obj = cls.__new__(cls)
        obj._init_detached()
        hp = header["hparams"]
        obj.module = NBModule(header["n_input"], header["n_genes"], use_library=header["use_library"], **hp)
        obj.module.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")})
        obj.module.eval()
        obj.genes_, obj.seed_ = list(header["genes"]), int(header["seed"])
        obj.setup_args_, obj.embedding_provenance_ = dict(header["setup_args"]), dict(header["embedding"])
        obj._hparams = dict(hp)
        obj.standardize_ = header.get("standardize", "per_feature")  # files written before the option: z-scores
        obj.init_params_ = {"non_kwargs": {}, "kwargs": {**hp, "seed": obj.seed_, "standardize": obj.standardize_}}
        obj.history_ = _history_from_json(header.get("history"))
        obj.train_indices_ = tensors["train_indices_"].numpy() if "train_indices_" in tensors else None
        obj.validation_indices_ = (tensors["validation_indices_"].numpy() if "validation_indices_" in tensors
                                   else None)
        obj.is_trained_ = True
        obj._train_kwargs = dict(header.get("train_kwargs") or {})
        obj.calibration_ = _get_calibration(header, tensors)
        obj._set_summary(header["n_input"], header["n_genes"], hp["n_hidden"], hp["n_layers"], header["use_library"])
        if adata is not None:
            obj._attach(adata)
        return obj

    def _init_detached(self) -> None:
        """The state :class:`scvi.model.base.BaseModelClass` sets up, without a registered table."""
        self.id = str(uuid4())
        self._adata, self._adata_manager, self.registry_, self.summary_stats = None, None, None, {}
        self._module_init_on_train = False
        self.is_trained_, self._model_summary_string = False, ""
        self.train_indices_ = self.test_indices_ = self.validation_indices_ = None
        self.history_ = None
        self.get_normalized_function_name_ = "get_normalized_expression"
        self.run_name_ = f"run_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}"
        self.run_id_ = ""

    def _attach(self, adata: AnnData) -> None:
        """Make ``adata`` the default table; register it (so training can continue) when it has the genes' counts."""
        self._adata = adata
        args = self.setup_args_
        if args["embedding_key"] in adata.obsm and pd.Index(self.genes_).isin(adata.var_names).all():
            check_embedding(adata, self.embedding_provenance_)
            type(self).setup_anndata(adata, **{**args, "target_key": None})
            mgr = self._get_most_recent_anndata_manager(adata, required=True)
            self._adata_manager = mgr
            self._register_manager_for_instance(mgr)
            self.registry_ = mgr._registry
            self.summary_stats = AnnDataManager._get_summary_stats_from_registry(self.registry_)

    # ------------------------------------------------------------------ inference
    def _embedding_and_library(self, adata: AnnData, library_size: str) -> tuple[np.ndarray, np.ndarray | None]:
        args = self.setup_args_
        key = check_embedding(adata, self.embedding_provenance_, embedding_key=args["embedding_key"])
        emb = check_matrix(adata.obsm[key], f"adata.obsm[{key!r}]", n_obs=adata.n_obs,
                           n_cols=int(self.module.feature_mean.shape[0])).astype(np.float32)
        lib = None
        if self.module.use_library:
            if library_size == "observed":
                lib = log_library(adata, args["library_size"], args["layer"]).astype(np.float32)
            elif library_size != "reference":
                msg = f"library_size must be 'observed' or 'reference', got {library_size!r}."
                raise ValueError(msg)
        return emb, lib

    def _table(self, adata: AnnData | None) -> AnnData:
        adata = self.adata if adata is None else adata
        if adata is None:
            msg = "This model has no table attached; pass adata holding its embedding (e.g. model.predict(adata))."
            raise ValueError(msg)
        if not isinstance(adata, AnnData):
            from ..._spatial import get_table

            adata = get_table(adata)
        return adata

    @torch.inference_mode()
    def _nb_params(self, adata: AnnData | None, batch_size: int, library_size: str) -> tuple[np.ndarray, np.ndarray]:
        adata = self._table(adata)
        emb, lib = self._embedding_and_library(adata, library_size)
        self.module.eval()
        rs, bs = [], []
        for i in range(0, emb.shape[0], batch_size):
            lb = None if lib is None else torch.from_numpy(lib[i:i + batch_size])
            o = self.module.inference(torch.from_numpy(emb[i:i + batch_size]), lb)
            rs.append(o["r"].double().cpu())
            bs.append(o["logits"].double().cpu())
        g = int(self.module.n_genes)
        if not rs:
            return np.zeros((0, g)), np.zeros((0, g))
        return torch.cat(rs).numpy(), torch.cat(bs).numpy()

    def get_nb_params(self, adata: AnnData | None = None, *, batch_size: int = 1024,
                      library_size: str = "observed") -> tuple[np.ndarray, np.ndarray]:
        """NB ``r`` and success logits (``p = sigmoid(logits)``), each ``(n_obs, n_genes)``.

        Parameters
        ----------
        adata
            Any table with the model's embedding in ``.obsm`` (its genes do not matter); ``None``
            uses the attached table.
        batch_size
            Spots per forward pass.
        library_size
            With a library-size offset: ``'observed'`` reads it from ``adata`` as registered,
            ``'reference'`` uses the training mean (for tables without counts).

        Examples
        --------
        >>> r, logits = model.get_nb_params(adata)  # doctest: +SKIP
        """
        check_trained(self)
        if int(batch_size) < 1:
            msg = f"batch_size must be ≥ 1, got {batch_size!r}."
            raise ValueError(msg)
        return self._nb_params(adata, int(batch_size), library_size)

    def get_mean_variance(self, adata: AnnData | None = None, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """NB mean ``r(1−p)/p`` and variance ``r(1−p)/p²`` on the count scale, each ``(n_obs, n_genes)``.

        Parameters
        ----------
        adata
            Table with the embedding (``None``: the attached table).
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
        variance ``Var[log1p Y]`` under the predicted NB (no delta method, no sampling), interpolated
        from a table of wide-support sums of the NB pmf, computed once per process (absolute error
        < 1e-3 on the mean for ``r`` in [0.01, 1000] and means in [0.001, 1000]; tested). ``scale='counts'``:
        the NB mean and variance.

        Parameters
        ----------
        adata
            Table with the embedding (from the encoder the model was trained with; checked); it may
            hold any genes (``None``: the attached table).
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
        _check_scale(scale)
        r, b = self.get_nb_params(adata, **kwargs)
        mean, var = _moments(r, b, scale)
        return ExpressionPrediction(mean=mean, var_names=list(self.genes_), scale=scale, aleatoric=var)

    def predict_interval(self, adata: AnnData | None = None, *, level: float = 0.9, calibrated: bool | None = None,
                         **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Central predictive interval of the counts that should hold a fraction ``level`` of them.

        Uncalibrated: the NB quantiles ``(1 ± level)/2``. Calibrated (after :meth:`calibrate`):
        the NB quantiles of the conformally calibrated level.

        Parameters
        ----------
        adata
            Table with the embedding (``None``: the attached table).
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
        >>> lo, hi = model.predict_interval(adata, level=0.9, calibrated=False)  # raw NB quantiles  # doctest: +SKIP
        """
        _check_level(level)
        cal = resolve_calibrated(self, calibrated)
        r, b = self.get_nb_params(adata, **kwargs)
        return _interval(r[None], b[None], level, cal)


def _check_scale(scale: str) -> None:
    if scale not in ("log1p", "counts"):
        msg = f"scale must be 'log1p' or 'counts', got {scale!r}."
        raise ValueError(msg)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        msg = f"level must be in (0, 1), got {level!r}."
        raise ValueError(msg)


def _moments(r: np.ndarray, b: np.ndarray, scale: str) -> tuple[np.ndarray, np.ndarray]:
    _check_scale(scale)
    if r.shape[0] == 0:
        return np.zeros(r.shape), np.zeros(r.shape)
    if scale == "log1p":
        return nb_log1p_moments_fast(r, b)
    m, v = nb_mean_var(torch.from_numpy(r), torch.from_numpy(b))
    return m.numpy(), v.numpy()


def _interval(r: np.ndarray, b: np.ndarray, level: float,
              calibration: ConformalCalibration | None = None) -> tuple[np.ndarray, np.ndarray]:
    _check_level(level)
    if r.shape[1] == 0:
        return np.zeros(r.shape[1:]), np.zeros(r.shape[1:])
    lv = level if calibration is None else calibration.levels(level, r.shape[-1])
    if np.ndim(lv) and len(lv) != r.shape[-1]:
        msg = f"the calibration has {len(lv)} genes but the model predicts {r.shape[-1]}."
        raise ValueError(msg)
    lo, hi = nb_mixture_quantiles(r, b, ((1 - lv) / 2, (1 + lv) / 2))
    return lo, hi


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """Training arguments that a JSON header can hold (others are dropped)."""
    import json

    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def _put_calibration(cal: ConformalCalibration | None, header: dict[str, Any], tensors: dict[str, Any],
                     prefix: str = "calibration.") -> None:
    if cal is None:
        return
    h, t = cal.to_state()
    header["calibration"] = h
    tensors.update({prefix + k: v for k, v in t.items()})


def _get_calibration(header: dict[str, Any], tensors: dict[str, Any],
                     prefix: str = "calibration.") -> ConformalCalibration | None:
    if not header.get("calibration"):
        return None
    t = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return ConformalCalibration.from_state(header["calibration"], t)
