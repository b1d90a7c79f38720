"""Deep ensembles of NB regressors: aleatoric and epistemic uncertainty by the law of total variance."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData

from ..._logging import logger
from ..._prediction import ExpressionPrediction
from ..._utils import progress_bar
from ._conformal import (
    ConformalCalibration,
    coverage_scores,
    cross_conformal,
    resolve_calibrated,
    training_groups,
)
from ._model import NBRegressor, _interval, _moments


class NBEnsemble:
    """M :class:`NBRegressor` members with different seeds and, optionally, different encoders.

    For each spot and gene (STImage, law of total variance): the prediction is the mean of the
    member means, the **aleatoric** variance the mean of the member variances and the
    **epistemic** variance the variance of the member means (``ddof=0``). On the log1p scale the
    member moments are the exact ``E[log1p Y]``/``Var[log1p Y]`` of :meth:`NBRegressor.predict`.

    Parameters
    ----------
    adata
        Table registered with :meth:`NBRegressor.setup_anndata` (its setup arguments are reused
        for every member).
    n_members
        Number of members M.
    seeds
        One seed per member (default ``0 … M−1``).
    embedding_keys
        ``.obsm`` keys of different encoders, cycled over the members (deep ensemble over
        encoders, as FSTImage); ``None`` uses the registered key for all.
    **model_kwargs
        Passed to :class:`NBRegressor` (``n_hidden``, ``n_layers``, ``dropout``).

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(200, 20, image=False, as_anndata=True)
    >>> si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
    >>> ens = si.models.NBEnsemble(adata, n_members=3)
    >>> ens.train(max_epochs=5, accelerator="cpu")  # doctest: +SKIP
    >>> pred = ens.predict(adata)  # doctest: +SKIP
    >>> pred.epistemic.shape  # doctest: +SKIP
    (200, 20)
    """

    def __init__(self, adata: AnnData, *, n_members: int = 5, seeds: Sequence[int] | None = None,
                 embedding_keys: Sequence[str] | None = None, **model_kwargs: Any):
        if seeds is None:
            seeds = list(range(int(n_members)))
        seeds = [int(s) for s in seeds]
        if len(seeds) < 2:
            msg = f"an ensemble needs at least 2 members, got {len(seeds)}."
            raise ValueError(msg)
        try:
            mgr = NBRegressor._get_most_recent_anndata_manager(adata, required=True)
        except ValueError as e:
            msg = "Run si.models.NBRegressor.setup_anndata(adata, embedding_key=...) first."
            raise ValueError(msg) from e
        args = dict(mgr.registry["setup_args"])
        keys = list(embedding_keys) if embedding_keys is not None else [args["embedding_key"]]
        self.members: list[NBRegressor] = []
        for i, seed in enumerate(seeds):
            key = keys[i % len(keys)]
            if key != args["embedding_key"] or len(keys) > 1:
                NBRegressor.setup_anndata(adata, **{**args, "embedding_key": key})
            self.members.append(NBRegressor(adata, seed=seed, **model_kwargs))
        if len(keys) > 1:  # leave the table registered as the user set it up
            NBRegressor.setup_anndata(adata, **args)
        self.adata = adata
        self.seeds = seeds
        self.embedding_keys = [m.adata_manager.registry["setup_args"]["embedding_key"] for m in self.members]
        self.genes_ = list(self.members[0].genes_)
        self.calibration_: ConformalCalibration | None = None

    @classmethod
    def from_members(cls, members: Sequence[NBRegressor]) -> NBEnsemble:
        """Build an ensemble from trained :class:`NBRegressor` s predicting the same genes.

        Examples
        --------
        >>> ens = si.models.NBEnsemble.from_members([m1, m2, m3])  # doctest: +SKIP
        """
        members = list(members)
        if len(members) < 2:
            msg = "an ensemble needs at least 2 members."
            raise ValueError(msg)
        genes = list(members[0].genes_)
        if any(list(m.genes_) != genes for m in members):
            msg = "all members must predict the same genes in the same order."
            raise ValueError(msg)
        obj = cls.__new__(cls)
        obj.members, obj.adata, obj.genes_ = members, members[0].adata, genes
        obj.seeds = [m.seed_ for m in members]
        obj.embedding_keys = [m.adata_manager.registry["setup_args"]["embedding_key"] for m in members]
        obj.calibration_ = None
        return obj

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        return (f"NBEnsemble of {len(self)} NBRegressor members, {len(self.genes_)} genes, "
                f"encoders {sorted(set(self.embedding_keys))}")

    def train(self, *, progress: bool | None = None, **train_kwargs: Any) -> None:
        """Train every member (each with its own seed); arguments as :meth:`NBRegressor.train`.

        Examples
        --------
        >>> ens.train(max_epochs=200, accelerator="cpu", train_indices=idx)  # doctest: +SKIP
        """
        start = time.perf_counter()
        train_kwargs.setdefault("progress", False)
        for m in progress_bar(self.members, desc="Training ensemble members", progress=progress):
            m.train(**train_kwargs)
        self.calibration_ = None
        logger.info("trained %d NB members in %.1fs", len(self), time.perf_counter() - start)

    def calibrate(self, groups: str | Sequence | np.ndarray | None = "library_id", *,
                  calibration_indices: Sequence[int] | np.ndarray | None = None, per_gene: bool = False,
                  progress: bool | None = None) -> NBEnsemble:
        """Conformally calibrate :meth:`predict_interval` (as :meth:`NBRegressor.calibrate`, for the mixture).

        Cross-conformal over ``groups``: every training section is predicted by an ensemble of the
        same members (settings and seeds) trained on the other sections — ``M`` extra trainings per
        section; or split-conformal on ``calibration_indices`` held out of training.

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
        The ensemble, with ``calibration_`` set.

        Examples
        --------
        >>> ens.train(train_indices=train)  # doctest: +SKIP
        >>> ens.calibrate("library_id")  # leave-one-section-out over the training sections  # doctest: +SKIP
        >>> lo, hi = ens.predict_interval(new, level=0.9)  # doctest: +SKIP
        """
        if not all(getattr(m, "is_trained_", False) for m in self.members):
            msg = "train the ensemble before calibrating it."
            raise RuntimeError(msg)
        first = self.members[0]
        adata = first.adata
        if calibration_indices is not None:
            from ..._validate import check_indices

            held = check_indices(calibration_indices, adata.n_obs, "calibration_indices")
            used = np.concatenate([np.r_[m.train_indices_, m.validation_indices_] for m in self.members])
            if (seen := np.intersect1d(held, used)).size:
                msg = (f"{seen.size} calibration spots were used in training; pass spots held out of training "
                       "(train with train_indices= excluding them).")
                raise ValueError(msg)
            r, b = self._params(adata[held])
            scores = coverage_scores(r, b, first._observed_counts(held))
            self.calibration_ = ConformalCalibration.from_scores(scores, method="split", per_gene=per_gene)
            return self
        rows = np.unique(np.concatenate([np.r_[m.train_indices_, m.validation_indices_] for m in self.members]))
        labels = training_groups(adata, groups, rows)

        def fit_params(fit, held):
            params = [m._fit_fold(fit).get_nb_params(adata[held]) for m in self.members]
            return np.stack([p[0] for p in params]), np.stack([p[1] for p in params])

        self.calibration_ = cross_conformal(fit_params, first._observed_counts, rows, labels, per_gene=per_gene,
                                            progress=progress)
        return self

    def _params(self, adata: AnnData | None = None, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        params = [m.get_nb_params(adata, **kwargs) for m in self.members]
        return np.stack([p[0] for p in params]), np.stack([p[1] for p in params])

    def member_predictions(self, adata: AnnData | None = None, *, scale: str = "log1p",
                           **kwargs: Any) -> list[ExpressionPrediction]:
        """Each member's :class:`~stimg.tl.ExpressionPrediction` (aleatoric only).

        Examples
        --------
        >>> preds = ens.member_predictions(adata)  # doctest: +SKIP
        """
        return [m.predict(adata, scale=scale, **kwargs) for m in self.members]

    def predict(self, adata: AnnData | None = None, *, scale: str = "log1p", **kwargs: Any) -> ExpressionPrediction:
        """Ensemble mean, aleatoric (mean of member variances) and epistemic (variance of member means).

        Parameters
        ----------
        adata
            Table with the members' embeddings (any genes); ``None``: the training table.
        scale
            ``'log1p'`` (exact NB moments of log1p counts) or ``'counts'``.
        **kwargs
            Passed to :meth:`NBRegressor.get_nb_params`.

        Examples
        --------
        >>> pred = ens.predict(adata)  # doctest: +SKIP
        >>> si.tl.predict_expression(adata, ens)  # doctest: +SKIP
        """
        means, variances = [], []
        for m in self.members:
            r, b = m.get_nb_params(adata, **kwargs)
            mu, var = _moments(r, b, scale)
            means.append(mu)
            variances.append(var)
        mu = np.stack(means)
        return ExpressionPrediction(mean=mu.mean(0), var_names=list(self.genes_), scale=scale,
                                    aleatoric=np.mean(variances, 0), epistemic=mu.var(0))

    def predict_interval(self, adata: AnnData | None = None, *, level: float = 0.9, calibrated: bool | None = None,
                         **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Central interval of the counts under the equal-weight mixture of member NBs.

        Parameters
        ----------
        adata
            Table with the members' embeddings (``None``: the training table).
        level
            Nominal coverage in (0, 1).
        calibrated
            ``None``: conformally calibrated when :meth:`calibrate` has run; ``True``: require it;
            ``False``: the raw mixture quantiles ``(1 ± level)/2``.
        **kwargs
            Passed to :meth:`NBRegressor.get_nb_params`.

        Returns
        -------
        ``(lower, upper)`` counts, each ``(n_obs, n_genes)``.

        Examples
        --------
        >>> lo, hi = ens.predict_interval(adata, level=0.9)  # doctest: +SKIP
        >>> lo, hi = ens.predict_interval(adata, level=0.9, calibrated=False)  # raw NB mixture  # doctest: +SKIP
        """
        cal = resolve_calibrated(self, calibrated)
        r, b = self._params(adata, **kwargs)
        return _interval(r, b, level, cal)

    def save(self, dir_path: str | Path, *, overwrite: bool = False, save_anndata: bool = False) -> None:
        """Save every member to ``dir_path/member_<i>`` plus ``ensemble.json``.

        Examples
        --------
        >>> ens.save("nb_ensemble", overwrite=True)  # doctest: +SKIP
        """
        d = Path(dir_path)
        if d.exists() and not overwrite and any(d.iterdir()):
            msg = f"{d} exists and is not empty; pass overwrite=True."
            raise ValueError(msg)
        d.mkdir(parents=True, exist_ok=True)
        for i, m in enumerate(self.members):
            m.save(str(d / f"member_{i}"), overwrite=True, save_anndata=save_anndata)
        (d / "ensemble.json").write_text(json.dumps({"n_members": len(self), "seeds": self.seeds,
                                                     "embedding_keys": self.embedding_keys}))

    @classmethod
    def load(cls, dir_path: str | Path, adata: AnnData | None = None, **kwargs: Any) -> NBEnsemble:
        """Load an ensemble written by :meth:`save` (``kwargs`` go to :meth:`NBRegressor.load`).

        Examples
        --------
        >>> ens = si.models.NBEnsemble.load("nb_ensemble", adata)  # doctest: +SKIP
        """
        d = Path(dir_path)
        meta_path = d / "ensemble.json"
        if not meta_path.exists():
            msg = f"{meta_path} not found: not a directory written by NBEnsemble.save."
            raise FileNotFoundError(msg)
        meta = json.loads(meta_path.read_text())
        members = [NBRegressor.load(str(d / f"member_{i}"), adata=adata, **kwargs) for i in range(meta["n_members"])]
        return cls.from_members(members)
