"""Deep ensembles of NB regressors: aleatoric and epistemic uncertainty by the law of total variance."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from anndata import AnnData

from ..._docs import d
from ..._logging import logger
from ..._prediction import ExpressionPrediction
from ..._utils import progress_bar
from .._base import ModelIO, check_trained, resolve_train_indices, train_defaults
from ._conformal import (
    ConformalCalibration,
    coverage_scores,
    cross_conformal,
    resolve_calibrated,
    training_groups,
)
from ._model import (
    NBRegressor,
    _check_level,
    _check_scale,
    _get_calibration,
    _interval,
    _moments,
    _put_calibration,
)


class NBEnsemble(ModelIO):
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
        One seed per member (default ``s … s+M−1`` with ``s`` = :attr:`stimg.settings.seed`).
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
    >>> ens.save("ensemble.stimg")  # one file; load it without the training table  # doctest: +SKIP
    >>> si.models.NBEnsemble.load("ensemble.stimg").predict(new_adata)  # doctest: +SKIP
    """

    def __init__(self, adata: AnnData, *, n_members: int = 5, seeds: Sequence[int] | None = None,
                 embedding_keys: Sequence[str] | None = None, **model_kwargs: Any):
        if seeds is None:
            seeds = [train_defaults().seed + i for i in range(int(n_members))]
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
        self.embedding_keys = [m.setup_args_["embedding_key"] for m in self.members]
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
        obj.embedding_keys = [m.setup_args_["embedding_key"] for m in members]
        obj.calibration_ = None
        return obj

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        return (f"NBEnsemble of {len(self)} NBRegressor members, {len(self.genes_)} genes, "
                f"encoders {sorted(set(self.embedding_keys))}")

    @property
    def is_trained_(self) -> bool:
        """Whether every member is trained."""
        return all(m.is_trained_ for m in self.members)

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
        **train_kwargs: Any,
    ) -> None:
        """Train every member; arguments as :meth:`NBRegressor.train`.

        Parameters
        ----------
        %(max_epochs)s
        %(train_indices)s
        %(accelerator)s
        %(devices)s
        seed
            ``None``: each member trains with its own seed; an integer ``s``: member ``i`` uses ``s + i``.
        progress
            One progress bar over the members; ``None`` uses :attr:`stimg.settings.progress`.
        **train_kwargs
            Passed to :meth:`NBRegressor.train`.

        Examples
        --------
        >>> ens.train(max_epochs=200, accelerator="cpu", train_indices="si_sampled")  # doctest: +SKIP
        """
        start = time.perf_counter()
        train_kwargs.setdefault("progress", False)
        for i, m in enumerate(progress_bar(self.members, desc="Training ensemble members", progress=progress)):
            m.train(max_epochs, train_indices=train_indices, accelerator=accelerator, devices=devices,
                    seed=None if seed is None else int(seed) + i, **train_kwargs)
        self.calibration_ = None
        logger.info("trained %d NB members in %.1fs", len(self), time.perf_counter() - start)

    def calibrate(self, groups: str | Sequence | np.ndarray | None = "library_id", *,
                  calibration_indices: Sequence[int] | np.ndarray | str | None = None, per_gene: bool = False,
                  progress: bool | None = None) -> NBEnsemble:
        """Conformally calibrate :meth:`predict_interval` (as :meth:`NBRegressor.calibrate`, for the mixture).

        Cross-conformal over ``groups``: every training section is predicted by an ensemble of the
        same members (settings and seeds) trained on the other sections — ``M`` extra trainings per
        section; or split-conformal on ``calibration_indices`` held out of training. The
        calibration is saved with the ensemble.

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
        check_trained(self, "calibrate")
        first = self.members[0]
        adata = first.adata
        if first.adata_manager is None:
            msg = "calibration needs the training table; load the ensemble with it: NBEnsemble.load(path, adata)."
            raise RuntimeError(msg)
        used = np.unique(np.concatenate([m._used_rows() for m in self.members]))
        if calibration_indices is not None:
            held = resolve_train_indices(adata, calibration_indices, name="calibration_indices")
            if (seen := np.intersect1d(held, used)).size:
                msg = (f"{seen.size} calibration spots were used in training; pass spots held out of training "
                       "(train with train_indices= excluding them).")
                raise ValueError(msg)
            r, b = self._params(adata[held])
            scores = coverage_scores(r, b, first._observed_counts(held))
            self.calibration_ = ConformalCalibration.from_scores(scores, method="split", per_gene=per_gene)
            return self
        labels = training_groups(adata, groups, used)

        def fit_params(fit, held):
            params = [m._fit_fold(fit).get_nb_params(adata[held]) for m in self.members]
            return np.stack([p[0] for p in params]), np.stack([p[1] for p in params])

        self.calibration_ = cross_conformal(fit_params, first._observed_counts, used, labels, per_gene=per_gene,
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
        check_trained(self)
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
        check_trained(self)
        _check_scale(scale)
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
        check_trained(self)
        _check_level(level)
        cal = resolve_calibrated(self, calibrated)
        r, b = self._params(adata, **kwargs)
        return _interval(r, b, level, cal)


    # ------------------------------------------------------------------ persistence
    def _get_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        headers, tensors = [], {}
        for i, m in enumerate(self.members):
            h, t = m._get_state()
            headers.append(h)
            tensors.update({f"member{i}.{k}": v for k, v in t.items()})
        header = {"members": headers, "seeds": list(self.seeds), "embedding_keys": list(self.embedding_keys)}
        _put_calibration(self.calibration_, header, tensors)
        return header, tensors

    @classmethod
    def _from_state(cls, header: dict[str, Any], tensors: dict[str, Any], adata: AnnData | None = None,
                    **kwargs: Any) -> NBEnsemble:
        members = []
        for i, h in enumerate(header["members"]):
            pre = f"member{i}."
            t = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
            members.append(NBRegressor._from_state(h, t, adata, **kwargs))
        obj = cls.from_members(members)
        obj.calibration_ = _get_calibration(header, tensors)
        return obj
