"""HEST-style ridge baseline on frozen image features (scikit-learn; no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._constants import TARGET_KEY
from .._docs import d
from .._logging import logger
from .._prediction import ExpressionPrediction
from .._spatial import library_column
from .._utils import warn
from .._validate import assert_key_in, check_matrix, check_nonempty
from ._base import (
    ModelIO,
    check_embedding,
    check_trained,
    embedding_provenance,
    resolve_train_indices,
    train_defaults,
)

_DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 6, 17))
#: a feature's sd is floored at this fraction of the median feature sd of the training spots
SD_FLOOR = 0.1


def _floored_scaler():
    """StandardScaler whose sd is floored at ``SD_FLOOR`` × the median sd.

    A feature (nearly) constant on a few training spots — common for sparse CNN features when a
    model is trained on a small sampled set — would otherwise get a tiny sd, and new spots whose
    value differs would be standardised to |z| ~ 10⁴ and wreck the predictions.
    """
    from sklearn.preprocessing import StandardScaler

    class FlooredScaler(StandardScaler):
        def fit(self, X, y=None, sample_weight=None):
            super().fit(X, y, sample_weight)
            if self.scale_ is not None and self.scale_.size:
                self.scale_ = np.maximum(self.scale_, SD_FLOOR * float(np.median(self.scale_)))
            return self

    return FlooredScaler()


def log1p_counts(adata, genes: Sequence[str], layer: str | None, rows: np.ndarray | None = None) -> np.ndarray:
    """``log1p`` of the raw counts of ``genes`` (dense float64), checking they look like counts."""
    import scipy.sparse as sp

    if layer is not None:
        assert_key_in(adata.layers, layer, where="adata.layers", hint="Pass the raw-count layer, or layer=None for X.")
    X = adata.layers[layer] if layer is not None else adata.X
    cols = adata.var_names.get_indexer(list(genes))
    sub = X[rows][:, cols] if rows is not None else X[:, cols]
    Y = np.asarray(sub.toarray() if sp.issparse(sub) else sub, dtype=np.float64)
    if not np.isfinite(Y).all():
        msg = "The count matrix has non-finite values for the target genes; drop those spots first."
        raise ValueError(msg)
    if (Y < 0).any():
        msg = (f"{'layer ' + repr(layer) if layer else 'X'} has negative values: pass raw counts (targets are "
               "log1p of counts).")
        raise ValueError(msg)
    return np.log1p(Y)


class RidgeRegressor(ModelIO):
    """Ridge regression from frozen patch features to log1p expression (the HEST baseline).

    Features are standardised (each sd floored at 0.1 × the median feature sd, so a feature almost
    constant on the training spots cannot blow up predictions), reduced by PCA to ``n_components``
    (capped by the data), and regressed on ``log1p`` counts of the target genes by ridge. With ``alpha='cv'`` the penalty is
    chosen from ``alphas`` by cross-validation on the training spots: leave-one-section-out when
    the training spots span 2 to ``cv`` sections, grouped ``cv``-fold by section when they span
    more, shuffled ``cv``-fold for one section. Standardisation and PCA are refitted inside every
    fold (no leakage), scored by mean squared error over genes and spots, and the best alpha
    (first on ties) is refitted on all training spots.

    Parameters
    ----------
    n_components
        PCA components; capped by the number of features and of training spots per fold.
        ``None`` skips PCA.
    alpha
        Ridge penalty, or ``'cv'`` to choose it from ``alphas``.
    alphas
        Candidate penalties for ``alpha='cv'``.
    cv
        Maximum number of folds.
    seed
        Seed of the shuffled folds (single-section training); ``None`` uses :attr:`stimg.settings.seed`.

    Attributes
    ----------
    var_names_
        Predicted genes.
    embedding_key_
        ``.obsm`` key of the features.
    alpha_
        Chosen penalty.
    cv_results_
        :class:`~pandas.DataFrame` of mean and per-fold validation MSE per alpha (``alpha='cv'``).
    coef_
        Fitted arrays: ``scale_mean``, ``scale_sd``, ``pca_mean``/``pca_components`` (with PCA),
        ``ridge_coef``, ``ridge_intercept``; predictions are ``ridge(pca(standardise(x)))``.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> adata = si.datasets.synthetic(120, 20, n_sections=2, image=False, as_anndata=True)
    >>> adata.obsm["X_feat"] = np.random.default_rng(0).normal(size=(adata.n_obs, 16))
    >>> model = si.models.RidgeRegressor(n_components=8).fit(adata, "X_feat", genes=adata.var_names[:5])
    >>> si.tl.predict_expression(adata, model)
    >>> adata.layers["si_pred"].shape
    (240, 20)
    >>> model.save("ridge.stimg")  # one safetensors file; no pickle  # doctest: +SKIP
    >>> si.models.RidgeRegressor.load("ridge.stimg").predict(new_adata)  # doctest: +SKIP
    """

    def __init__(self, *, n_components: int | None = 256, alpha: float | str = "cv",
                 alphas: Sequence[float] = _DEFAULT_ALPHAS, cv: int = 5, seed: int | None = None,
                 random_state: int | None = None) -> None:
        if random_state is not None:
            warn("RidgeRegressor(random_state=) is deprecated; pass seed= (the name every stimg model uses).",
                 FutureWarning)
            seed = random_state if seed is None else seed
        if n_components is not None and int(n_components) < 1:
            msg = f"n_components must be ≥ 1 or None, got {n_components!r}."
            raise ValueError(msg)
        if isinstance(alpha, str):
            if alpha != "cv":
                msg = f"alpha must be a positive number or 'cv', got {alpha!r}."
                raise ValueError(msg)
        elif not (np.isfinite(alpha) and alpha > 0):
            msg = f"alpha must be a positive number or 'cv', got {alpha!r}."
            raise ValueError(msg)
        if len(alphas) == 0 or any(not (np.isfinite(a) and a > 0) for a in alphas):
            msg = "alphas must be a non-empty list of positive numbers."
            raise ValueError(msg)
        if int(cv) < 2:
            msg = f"cv must be ≥ 2, got {cv!r}."
            raise ValueError(msg)
        self.n_components, self.alpha, self.alphas = n_components, alpha, tuple(float(a) for a in alphas)
        self.cv, self.seed = int(cv), train_defaults(seed=seed).seed
        self.coef_: dict[str, np.ndarray] | None = None

    @property
    def is_trained_(self) -> bool:
        """Whether the model is fitted (or loaded)."""
        return self.coef_ is not None

    def __repr__(self) -> str:
        state = f"fitted on {len(self.var_names_)} genes, alpha={self.alpha_:g}" if self.is_trained_ else "unfitted"
        return f"RidgeRegressor(n_components={self.n_components}, alpha={self.alpha!r}) [{state}]"

    # ------------------------------------------------------------------ fitting
    def _make(self, alpha: float, k: int | None):
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import Pipeline
        steps = [("scale", _floored_scaler())]
        if k is not None:
            steps.append(("pca", PCA(n_components=k, svd_solver="full")))
        steps.append(("ridge", Ridge(alpha=alpha)))
        return Pipeline(steps)

    def _folds(self, groups: np.ndarray, n: int):
        from sklearn.model_selection import GroupKFold, KFold, LeaveOneGroupOut

        n_groups = len(pd.unique(groups))
        if n_groups >= 2:
            splitter = LeaveOneGroupOut() if n_groups <= self.cv else GroupKFold(n_splits=self.cv)
            return list(splitter.split(np.zeros(n), groups=groups)), type(splitter).__name__
        k = min(self.cv, n)
        return list(KFold(k, shuffle=True, random_state=self.seed).split(np.zeros(n))), f"KFold({k})"

    @d.dedent
    def fit(
        self,
        adata: Any,
        embedding_key: str,
        layer: str | None = None,
        genes: Sequence[str] | None = None,
        train_indices: Sequence[int] | np.ndarray | str | None = None,
        *,
        library_key: str | None = None,
        train_mask: np.ndarray | str | None = None,
    ) -> RidgeRegressor:
        """Fit on the training spots.

        Parameters
        ----------
        adata
            Table with features in ``.obsm[embedding_key]`` and raw counts in ``layer``/``X``.
        embedding_key
            Features, e.g. ``'X_efficientnet_lite0'`` from :func:`stimg.pp.embed`.
        layer
            Raw-count layer; ``None`` uses ``X``.
        genes
            Target genes; ``None`` uses ``.var['si_target']`` (:func:`stimg.pp.select_genes`).
        %(train_indices)s
        library_key
            ``.obs`` column of sections (groups of the alpha cross-validation); ``None`` finds it.
        train_mask
            Deprecated name of ``train_indices``.

        Returns
        -------
        ``self``.
        """
        from .._spatial import get_table

        adata = get_table(adata)
        assert_key_in(adata.obsm, embedding_key, where="adata.obsm", hint="Run si.pp.embed first.")
        if genes is None:
            assert_key_in(adata.var, TARGET_KEY, where="adata.var",
                          hint="Choose target genes with si.pp.select_genes (on training sections) or pass genes=.")
            genes = adata.var_names[adata.var[TARGET_KEY].to_numpy(bool)]
        genes = [str(g) for g in genes]
        check_nonempty(len(genes), "The target gene list", "Pass genes= or run si.pp.select_genes.")
        missing = pd.Index(genes).difference(adata.var_names)
        if len(missing):
            msg = f"{len(missing)} target genes are not in adata.var_names (e.g. {list(missing[:3])})."
            raise KeyError(msg)
        if train_mask is not None:
            warn("RidgeRegressor.fit(train_mask=) is deprecated; pass train_indices= (the name every stimg model "
                 "uses; it takes the same masks and .obs column names).", FutureWarning)
            if train_indices is None:
                train_indices = train_mask
        rows = resolve_train_indices(adata, train_indices)
        X = check_matrix(np.asarray(adata.obsm[embedding_key])[rows], f"obsm[{embedding_key!r}] (training spots)")
        Y = log1p_counts(adata, genes, layer, rows)
        n, p = X.shape
        if n < 3:
            msg = f"Ridge needs at least 3 training spots, got {n}."
            raise ValueError(msg)
        _, libs = library_column(adata, library_key)
        groups = libs.to_numpy()[rows]
        folds, cv_name = self._folds(groups, n) if self.alpha == "cv" else ([], None)
        min_train = min([len(tr) for tr, _ in folds] + [n])
        k = None if self.n_components is None else int(min(self.n_components, p, min_train))
        if self.alpha == "cv":
            from sklearn.metrics import mean_squared_error

            scores = np.zeros((len(self.alphas), len(folds)))
            for j, (tr, va) in enumerate(folds):
                base = self._make(1.0, k)[:-1].fit(X[tr])  # scaler (+ PCA) refitted inside the fold
                Ztr, Zva = base.transform(X[tr]), base.transform(X[va])
                for i, a in enumerate(self.alphas):
                    r = self._make(a, k)[-1].fit(Ztr, Y[tr])
                    scores[i, j] = mean_squared_error(Y[va], r.predict(Zva))
            mean = scores.mean(1)
            best = int(np.argmin(mean))
            self.alpha_ = self.alphas[best]
            self.cv_results_ = pd.DataFrame(scores, index=pd.Index(self.alphas, name="alpha"),
                                            columns=[f"fold{j}" for j in range(len(folds))]).assign(mean_mse=mean)
            if best in (0, len(self.alphas) - 1):
                logger.info("ridge: the chosen alpha %g is at the edge of the grid; consider widening alphas", self.alpha_)
        else:
            self.alpha_, self.cv_results_ = float(self.alpha), None
        pipe = self._make(self.alpha_, k).fit(X, Y)
        coef = {"scale_mean": pipe["scale"].mean_, "scale_sd": pipe["scale"].scale_,
                "ridge_coef": pipe["ridge"].coef_, "ridge_intercept": np.atleast_1d(pipe["ridge"].intercept_)}
        if k is not None:
            coef |= {"pca_mean": pipe["pca"].mean_, "pca_components": pipe["pca"].components_}
        self.coef_ = {n: np.asarray(v, dtype=np.float64) for n, v in coef.items()}
        self.embedding_provenance_ = embedding_provenance(adata, embedding_key)
        self.var_names_, self.embedding_key_, self.n_components_ = genes, embedding_key, k
        self.n_features_in_, self.cv_scheme_, self.n_train_ = p, cv_name, n
        logger.info("ridge: %d spots × %d features → %d genes, PCA %s, alpha %g (%s)", n, p, len(genes), k,
                    self.alpha_, cv_name or "fixed")
        return self

    # --------------------------------------------------------------- predicting
    def _predict_array(self, X: np.ndarray) -> np.ndarray:
        c = self.coef_
        z = (np.asarray(X, dtype=np.float64) - c["scale_mean"]) / c["scale_sd"]
        if "pca_components" in c:
            z = (z - c["pca_mean"]) @ c["pca_components"].T
        return z @ c["ridge_coef"].T + c["ridge_intercept"]

    def predict(self, adata: Any, *, embedding_key: str | None = None) -> ExpressionPrediction:
        """Predict ``log1p`` expression of the fitted genes for every spot.

        Parameters
        ----------
        adata
            Table with features from the encoder the model was fitted on (checked) in ``.obsm``.
        embedding_key
            ``None`` uses the key the model was fitted on.

        Returns
        -------
        :class:`~stimg.tl.ExpressionPrediction` with ``scale='log1p'``.

        Examples
        --------
        >>> pred = model.predict(adata)  # doctest: +SKIP
        """
        from .._spatial import get_table

        check_trained(self)
        adata = get_table(adata)
        key = check_embedding(adata, self.embedding_provenance_, embedding_key=embedding_key or self.embedding_key_)
        X = check_matrix(np.asarray(adata.obsm[key]), f"obsm[{key!r}]", n_cols=self.n_features_in_)
        return ExpressionPrediction(self._predict_array(X).astype(np.float32), list(self.var_names_), scale="log1p")

    # -------------------------------------------------------------- persisting
    _ATTRS = ("n_components", "alpha", "alphas", "cv", "seed", "alpha_", "var_names_", "embedding_key_",
              "n_components_", "n_features_in_", "cv_scheme_", "n_train_", "embedding_provenance_")

    def _get_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        header = {a: getattr(self, a) for a in self._ATTRS}
        header["alphas"] = list(self.alphas)
        header["cv_results"] = None if self.cv_results_ is None else self.cv_results_.reset_index().to_dict(orient="list")
        return header, dict(self.coef_)

    @classmethod
    def _from_state(cls, header: dict[str, Any], tensors: dict[str, Any], adata: Any = None,
                    **kwargs: Any) -> RidgeRegressor:
        model = cls.__new__(cls)
        for a in cls._ATTRS:
            setattr(model, a, header[a])
        model.alphas = tuple(model.alphas)
        cvr = header.get("cv_results")
        model.cv_results_ = None if cvr is None else pd.DataFrame(cvr).set_index("alpha")
        model.coef_ = {k: v.numpy() for k, v in tensors.items()}
        return model
