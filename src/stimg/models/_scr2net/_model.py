"""SCR2Net: regression with retrieval-augmented soft labels and majority cell-type filtering (SCR²-ST §2.3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
from ..._validate import assert_key_in, check_matrix, check_nonempty
from .._base import (
    ModelIO,
    check_embedding,
    check_trained,
    embedding_provenance,
    resolve_train_indices,
    train_defaults,
)
from .._contrastive import l2_normalize
from .._nb._data import resolve_genes
from .._nb._training import quiet_lightning, split_train_validation
from .._ridge import log1p_counts
from ._module import SCR2Module, robust_std
from ._plan import OPTIMIZERS, LossWeights, RetrievalConfig, history_frame, make_plan

_DEFAULT_EPOCHS = {"features": 100, "end-to-end": 20}
_N_STATS = 256  # patches used to standardise the initial features of an end-to-end encoder

#: How the regression prediction ``ŷ`` and the retrieved profile ``ŷ_ret`` become the output.
PREDICT_MODES: dict[str, Callable[[torch.Tensor, torch.Tensor | None, float], torch.Tensor]] = {
    "regression": lambda reg, ret, alpha: reg,
    "retrieval": lambda reg, ret, alpha: ret,
    "blend": lambda reg, ret, alpha: alpha * reg + (1.0 - alpha) * ret,
}


# ---------------------------------------------------------------------------------------------- inputs
def _cell_types(table, cell_types: Any, rows: np.ndarray, layer: str | None) -> tuple[np.ndarray, list[str]]:
    """Cell-type codes of ``rows`` and the type names, from an ``.obsm``/``.obs`` key, a prior or an array."""
    from .._sc_prior import SingleCellPrior

    if isinstance(cell_types, SingleCellPrior):
        sub = table[rows]
        labels = cell_types.cell_types(sub, layer=layer)
        return np.asarray(labels.codes, dtype=np.int64), [str(c) for c in labels.categories]
    if isinstance(cell_types, str):
        if cell_types in table.obsm:
            prop = table.obsm[cell_types]
            names = [str(c) for c in prop.columns] if isinstance(prop, pd.DataFrame) else None
            p = check_matrix(prop, f"obsm[{cell_types!r}]", n_obs=table.n_obs)[rows]
            if not np.isfinite(p).all():
                msg = f"obsm[{cell_types!r}] has non-finite proportions for training spots; fill or drop them."
                raise ValueError(msg)
            names = names or [f"type_{i}" for i in range(p.shape[1])]
            return p.argmax(1).astype(np.int64), names
        if cell_types in table.obs:
            col = table.obs[cell_types]
            cat = pd.Categorical(col.to_numpy()[rows].astype(object))
            if (cat.codes < 0).any():
                msg = (f"obs[{cell_types!r}] has {int((cat.codes < 0).sum())} missing cell types among the training "
                       "spots; fill them or leave those spots out of train_indices.")
                raise ValueError(msg)
            return cat.codes.astype(np.int64), [str(c) for c in cat.categories]
        avail = [f"obsm[{k!r}]" for k in table.obsm] + [f"obs[{k!r}]" for k in table.obs]
        msg = (f"cell_types={cell_types!r} is neither an .obsm proportion matrix (e.g. her2st's 'deconv_major') nor an "
               f".obs column. Available: {avail[:30]}. Pass a fitted si.models.SingleCellPrior to type spots by their "
               "nearest reference cells, or cell_types=None to retrieve without the cell-type filter.")
        raise KeyError(msg)
    arr = np.asarray(cell_types, dtype=object)
    if arr.shape != (table.n_obs,):
        msg = (f"cell_types must be an .obsm/.obs key, a fitted SingleCellPrior or one label per spot "
               f"({table.n_obs}), got {type(cell_types).__name__} of shape {arr.shape}.")
        raise TypeError(msg)
    cat = pd.Categorical(arr[rows])
    if (cat.codes < 0).any():
        msg = "cell_types has missing labels for training spots; fill them or leave those spots out."
        raise ValueError(msg)
    return cat.codes.astype(np.int64), [str(c) for c in cat.categories]


class _Spots(Dataset):
    """Items ``(x, y, bank position)``: ``x`` a feature row or a uint8 patch (end to end)."""

    def __init__(self, x: np.ndarray | None, patches: Any, items: np.ndarray | None, y: np.ndarray | None,
                 pos: np.ndarray | None):
        self.x, self.patches, self.items = x, patches, items
        n = len(x) if x is not None else len(items)
        self.y = None if y is None else torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
        self.pos = torch.from_numpy(np.full(n, -1, np.int64) if pos is None else pos.astype(np.int64))
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.x[i]) if self.x is not None else self.patches[int(self.items[i])]
        if self.y is None:
            return x
        return x, self.y[i], self.pos[i]

    @staticmethod
    def collate(batch: list):
        if isinstance(batch[0], tuple):
            return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch]), torch.stack([b[2] for b in batch])
        return torch.stack(batch)


# ---------------------------------------------------------------------------------------------- model
@d.dedent
class SCR2Net(ModelIO):
    """SCR²Net: image → expression regression guided by retrieval from the measured spots (SCR²-ST).

    **Regression path.** Frozen patch features from ``.obsm[embedding_key]`` (default), or the
    output of a trainable encoder such as DenseNet-121 fed with the H&E patches (``encoder=``,
    end to end), are standardised and decoded by a two-layer MLP into ``log1p`` expression ``ŷ``.

    **Retrieval path.** Two projection heads of the shared contrastive core
    (``stimg.models._contrastive``) map image features and expression profiles into one space,
    trained with InfoNCE. The training spots form a memory bank (their keys are refreshed from
    the expression head every epoch). For each spot the top-``top_k`` bank spots by cosine
    similarity are retrieved (a training spot never retrieves itself); only those of the
    ``n_types`` most frequent cell types among them are kept; their mean profile is the soft
    label ``ŷ_ret``; the confidence mask ``m`` is 1 where the mean similarity of the ``top_k``
    exceeds ``sim_threshold``. The objective is::

        λ_r·MSE(ŷ, y) + λ_p·(1 − PCC(ŷ, y)) + λ_KD·m·‖ŷ − ŷ_ret‖² + λ_con·InfoNCE

    with PCC per gene across the spots of a minibatch and ``‖·‖²`` averaged over genes.

    **Prediction.** ``'regression'`` (``ŷ``, as the paper), ``'retrieval'`` (``ŷ_ret`` from the bank
    of training spots) or ``'blend'`` (``alpha·ŷ + (1 − alpha)·ŷ_ret``), through
    :func:`stimg.tl.predict_expression`.

    Parameters
    ----------
    data
        Training data: AnnData (or SpatialData) with raw counts and, for frozen features,
        ``.obsm[embedding_key]``; SpatialData/AnnData with images for ``encoder=``. Nothing is
        written into it.
    embedding_key
        ``.obsm`` key of frozen image features (e.g. ``'X_efficientnet_lite0'`` from :func:`stimg.pp.embed`).
    encoder
        Train this image encoder end to end instead (a :func:`stimg.encoders.get_encoder` name such
        as ``'densenet121'``, the paper's backbone, or a :class:`torch.nn.Module`). Give exactly one of
        ``embedding_key`` and ``encoder``.
    genes
        Target genes (overrides ``target_key``).
    target_key
        Boolean ``.var`` column of target genes (:func:`stimg.pp.select_genes`); ``None`` uses all genes.
    layer
        Layer with raw counts; ``None`` uses ``X``. Targets are ``log1p`` of the counts.
    cell_types
        Cell type of each bank spot for the majority filter: an ``.obsm`` key of per-spot
        proportions (arg-max, e.g. her2st's ``'deconv_major'``/``'deconv_minor'``), an ``.obs``
        column of labels, a fitted :class:`~stimg.models.SingleCellPrior` (type of the nearest
        reference cell), or one label per spot. Read only for training spots. ``None``: no filter.
    top_k
        Retrieved spots ``K`` (paper: 50).
    n_types
        Cell types kept ``T`` (paper: 10); ``None`` keeps all ``K``.
    sim_threshold
        Confidence threshold on the mean top-``K`` cosine similarity (paper: 0.15).
    retrieval
        ``False`` builds the regression path only (no heads, no distillation).
    lambda_reg, lambda_pcc, lambda_kd, lambda_con
        Loss weights (paper: 1, 0.25, 0.25; InfoNCE unweighted).
    n_hidden
        Hidden width of the regression MLP (paper's code: 1024).
    dropout
        Dropout of the regression MLP (0.5: chosen on HER2ST C LOSO folds C2 and C5, where 0.1 overfits).
    n_proj
        Width of the projection space (paper's code: 256).
    contrastive
        Contrastive loss of the shared core: ``'clip'`` (symmetric InfoNCE with a learnable temperature
        clamped to [0.01, 1]) or ``'siglip'``.
    %(table_key)s
    %(library_key)s
    patch_um
        Patch side in µm (``encoder=`` only).
    patch_px
        Patch side in pixels; ``None`` uses the encoder's input size (``encoder=`` only).
    input_px
        Network input side; ``None`` keeps the encoder's (``encoder=`` only).
    pretrained
        Start the encoder from its pretrained weights (``False``: random weights).
    seed
        Seed of the weight initialisation and default seed of :meth:`train`; ``None`` uses
        :attr:`stimg.settings.seed`.
    head_kwargs
        Passed to the core's ``ProjectionHead`` (default: hidden width ``n_proj``, dropout 0.1).
    contrastive_kwargs
        Passed to the contrastive loss (e.g. ``init_temperature``).
    encoder_kwargs
        Passed to :func:`stimg.encoders.get_encoder`.

    Attributes
    ----------
    genes_
        Predicted genes.
    history_
        Per-epoch training losses (``train_reg``, ``train_con``, ``train_kd``, ``train_mask`` = fraction
        of confident retrievals) and validation losses (``val_reg``, ``val_ret``, ``val_reg+ret``).
    best_epochs_
        Epoch whose weights each path kept (``'reg'``, ``'ret'``, or ``'reg+ret'`` end to end).
    cell_type_names_
        Names of the bank's cell types (empty without ``cell_types``).
    train_indices_, validation_indices_
        Table rows used for fitting (the memory bank) and for early stopping.

    Notes
    -----
    ``model.save(path)`` writes one safetensors file (weights, the memory bank and its cell types,
    genes, embedding provenance; no pickle). ``SCR2Net.load(path)`` predicts without any data;
    ``SCR2Net.load(path, data, encoder=..., cell_types=...)`` can be trained further (a custom
    encoder module or cell types from a prior/array are not stored in the file).

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(200, 20, image=False, as_anndata=True)
    >>> model = si.models.SCR2Net(adata, "X_synthetic", target_key=None, cell_types="cell_type_fractions")
    >>> model.train(max_epochs=2, accelerator="cpu", progress=False)  # doctest: +SKIP
    >>> si.tl.predict_expression(adata, model, mode="blend")  # doctest: +SKIP
    """

    def __init__(
        self,
        data: Any,
        embedding_key: str | None = None,
        *,
        encoder: str | nn.Module | None = None,
        genes: Sequence[str] | None = None,
        target_key: str | None = TARGET_KEY,
        layer: str | None = None,
        cell_types: Any = None,
        top_k: int = 50,
        n_types: int | None = 10,
        sim_threshold: float = 0.15,
        retrieval: bool = True,
        lambda_reg: float = 1.0,
        lambda_pcc: float = 0.25,
        lambda_kd: float = 0.25,
        lambda_con: float = 1.0,
        n_hidden: int = 1024,
        dropout: float = 0.5,
        n_proj: int = 256,
        contrastive: str = "clip",
        table_key: str = TABLE_KEY,
        library_key: str | None = None,
        patch_um: float = 112.0,
        patch_px: int | None = None,
        input_px: int | None = None,
        pretrained: bool = True,
        seed: int | None = None,
        head_kwargs: dict | None = None,
        contrastive_kwargs: dict | None = None,
        encoder_kwargs: dict | None = None,
    ) -> None:
        if (embedding_key is None) == (encoder is None):
            msg = ("Give exactly one of embedding_key= (frozen features in .obsm, e.g. 'X_efficientnet_lite0' from "
                   "si.pp.embed) and encoder= (train an image encoder such as 'densenet121' end to end).")
            raise ValueError(msg)
        if int(top_k) < 1:
            msg = f"top_k must be ≥ 1, got {top_k!r}."
            raise ValueError(msg)
        if n_types is not None and int(n_types) < 1:
            msg = f"n_types must be ≥ 1 or None (no cell-type filter), got {n_types!r}."
            raise ValueError(msg)
        if not np.isfinite(sim_threshold) or not -1.0 <= sim_threshold <= 1.0:
            msg = f"sim_threshold must be a cosine similarity in [-1, 1], got {sim_threshold!r}."
            raise ValueError(msg)
        for name, v in (("lambda_reg", lambda_reg), ("lambda_pcc", lambda_pcc), ("lambda_kd", lambda_kd),
                        ("lambda_con", lambda_con)):
            if not np.isfinite(v) or v < 0:
                msg = f"{name} must be a finite number ≥ 0, got {v!r}."
                raise ValueError(msg)
        seed = int(settings.seed if seed is None else seed)
        table = get_table(data, table_key)
        genes_ = resolve_genes(table, target_key, genes, require_key=True)
        if encoder is None:
            assert_key_in(table.obsm, embedding_key, where="adata.obsm",
                          hint="Compute image features first with si.pp.embed, or pass encoder= to train end to end.")
            n_input = check_matrix(table.obsm[embedding_key], f"obsm[{embedding_key!r}]", n_obs=table.n_obs,
                                   finite=False).shape[1]
            provenance = embedding_provenance(table, embedding_key)
        if cell_types is not None and not isinstance(cell_types, str):
            from .._sc_prior import SingleCellPrior

            if isinstance(cell_types, SingleCellPrior):
                cell_types._check_fitted()
            else:
                _cell_types(table, cell_types, np.arange(0), layer)  # shape check only
        elif isinstance(cell_types, str) and cell_types not in table.obsm and cell_types not in table.obs:
            _cell_types(table, cell_types, np.arange(0), layer)  # raises the KeyError with the fix
        self.params_ = {
            "embedding_key": embedding_key, "encoder": encoder if isinstance(encoder, str) or encoder is None else None,
            "layer": layer, "top_k": int(top_k), "n_types": None if n_types is None else int(n_types),
            "sim_threshold": float(sim_threshold), "retrieval": bool(retrieval), "lambda_reg": float(lambda_reg),
            "lambda_pcc": float(lambda_pcc), "lambda_kd": float(lambda_kd), "lambda_con": float(lambda_con),
            "n_hidden": int(n_hidden), "dropout": float(dropout), "n_proj": int(n_proj), "contrastive": contrastive,
            "contrastive_kwargs": contrastive_kwargs, "table_key": table_key,
            "library_key": library_key, "patch_um": float(patch_um), "patch_px": patch_px, "input_px": input_px,
            "seed": int(seed), "head_kwargs": head_kwargs, "encoder_kwargs": encoder_kwargs,
            "cell_types": cell_types if isinstance(cell_types, str) else None,
        }
        self.genes_ = list(genes_)
        self._data, self._cell_types_arg = data, cell_types
        enc_module = None
        with torch.random.fork_rng():
            torch.manual_seed(int(seed))
            if encoder is not None:
                enc_module, provenance = self._build_encoder(encoder, pretrained)
                n_input = enc_module.dim
            self.module = self._build_module(n_input, enc_module)
        self.provenance_ = provenance
        self.needs_images = encoder is not None
        self.is_trained_ = False
        self.history_: pd.DataFrame | None = None
        self.cell_type_names_: list[str] = []
        self.train_indices_ = self.validation_indices_ = None
        self._stats_set = False
        logger.info("SCR2Net: %s (%d features) → %d genes, %s", encoder if encoder is not None else embedding_key,
                    n_input, len(self.genes_),
                    f"retrieval K={top_k}, T={n_types}" if retrieval else "regression only")

    # ------------------------------------------------------------------ building
    def _build_encoder(self, encoder: str | nn.Module, pretrained: bool) -> tuple[nn.Module, dict]:
        from ...encoders import get_encoder

        p = self.params_
        enc = get_encoder(encoder, pretrained=pretrained, **(p["encoder_kwargs"] or {}))
        if p["input_px"] is not None:
            enc.input_px, enc.resize_px, enc._dim = int(p["input_px"]), None, None
        p["patch_px"] = int(p["patch_px"] or enc.input_px)
        prov = {"embedding_key": None, "encoder": enc.name, "encoder_identity": None, "patch_um": p["patch_um"],
                "patch_px": p["patch_px"], "stain": None, "dim": int(enc.dim)}
        return enc, prov

    def _build_module(self, n_input: int, encoder: nn.Module | None) -> SCR2Module:
        p = self.params_
        return SCR2Module(n_input, len(self.genes_), n_hidden=p["n_hidden"], dropout=p["dropout"],
                          retrieval=p["retrieval"], n_proj=p["n_proj"], encoder=encoder, head_kwargs=p["head_kwargs"],
                          contrastive=p["contrastive"], contrastive_kwargs=p["contrastive_kwargs"])

    def __repr__(self) -> str:
        p = self.params_
        src = p["encoder"] or p["embedding_key"] or "custom encoder"
        ret = f"K={p['top_k']}, T={p['n_types']}" if p["retrieval"] else "regression only"
        return f"SCR2Net({src!r} → {len(self.genes_)} genes, {ret}, {'trained' if self.is_trained_ else 'untrained'})"

    @property
    def loss_weights(self) -> LossWeights:
        """The objective's weights."""
        p = self.params_
        return LossWeights(p["lambda_reg"], p["lambda_pcc"], p["lambda_kd"], p["lambda_con"])

    @property
    def retrieval_config(self) -> RetrievalConfig:
        """``K``, ``T`` and the confidence threshold."""
        p = self.params_
        return RetrievalConfig(p["top_k"], p["n_types"], p["sim_threshold"])

    # ------------------------------------------------------------------ training
    def _patches(self, data: Any, table_key: str | None):
        from ...pp import extract_patches

        p = self.params_
        return extract_patches(data, patch_um=p["patch_um"], patch_px=p["patch_px"],
                               table_key=p["table_key"] if table_key is None else table_key,
                               library_key=p["library_key"])

    def _inputs(self, data: Any, table, rows: np.ndarray, table_key: str | None = None):
        """``(features or None, patches or None, items or None)`` for table ``rows``."""
        if not self.needs_images:
            key = self.params_["embedding_key"]
            x = check_matrix(np.asarray(table.obsm[key])[rows], f"obsm[{key!r}]",
                             n_cols=int(self.module.feature_mean.shape[0])).astype(np.float32)
            return x, None, None
        patches = self._patches(data, table_key)
        item_of_row = np.full(table.n_obs, -1, dtype=np.int64)
        item_of_row[patches.obs_index] = np.arange(len(patches))
        items = item_of_row[rows]
        if (items < 0).any():
            msg = (f"{int((items < 0).sum())} of the selected spots have no image patch; train and predict on spots "
                   "of sections with an image.")
            raise ValueError(msg)
        return None, patches, items

    @torch.no_grad()
    def _init_stats(self, x: np.ndarray | None, patches, items, y: np.ndarray, batch_size: int,
                    device: torch.device, seed: int) -> None:
        """Standardise features and expression with the training spots (first training only)."""
        m = self.module
        if x is None:  # initial encoder features of up to 256 training patches
            sel = np.sort(np.random.default_rng(seed).permutation(items)[:_N_STATS])
            x = self._run(_Spots(None, patches, sel, None, None), batch_size, device, "raw")
        m.feature_mean.copy_(torch.from_numpy(x.mean(0)))
        m.feature_std.copy_(robust_std(torch.from_numpy(x.std(0))))
        m.gene_mean.copy_(torch.from_numpy(y.mean(0)))
        m.gene_std.copy_(robust_std(torch.from_numpy(y.std(0))))
        m.regressor[-1].bias.copy_(m.gene_mean)
        self._stats_set = True

    @d.dedent
    def train(
        self,
        max_epochs: int | None = None,
        *,
        train_indices: Any = None,
        accelerator: str | None = None,
        devices: int | str | list[int] | None = None,
        seed: int | None = None,
        progress: bool | None = None,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: str = "adamw",
        lr_min_ratio: float = 0.01,
        validation_size: float = 0.1,
        early_stopping: bool = True,
        early_stopping_patience: int = 20,
        kd_start_epoch: int = 1,
        warmup_epochs: int = 0,
        augment: bool = True,
        num_workers: int = 0,
        **trainer_kwargs: Any,
    ) -> None:
        """Fit both paths jointly with Lightning (cosine learning-rate schedule).

        Parameters
        ----------
        %(max_epochs)s Defaults: 100 on frozen features, 20 end to end.
        %(train_indices)s
        %(accelerator)s
        %(devices)s
        seed
            Seed of the validation split, minibatch order and augmentation; ``None`` uses the model's ``seed``.
        %(progress)s
        batch_size
            Spots per step (paper: 256); also the InfoNCE negatives.
        lr
            Initial learning rate, annealed (cosine) to ``lr·lr_min_ratio``.
        weight_decay
            L2 penalty (paper: 1e-4).
        optimizer
            ``'adamw'`` (default) or ``'sgd'`` (momentum 0.9, the paper's choice for end-to-end
            training with ``lr=1e-4``).
        lr_min_ratio
            Final learning rate as a fraction of ``lr`` (paper: 1e-6 / 1e-4).
        validation_size
            Fraction of the training spots held out (drawn with ``seed``) for model selection; they
            stay out of the memory bank. Each path keeps the weights of its best validation epoch:
            the regression path by ``λ_r·MSE + λ_p·(1 − PCC)`` of ``ŷ``, the projection heads by the
            same loss of the retrieved ``ŷ_ret`` (with a trainable encoder both are selected
            together, on the sum). ``0`` trains on all spots for ``max_epochs``.
        early_stopping
            Stop when neither path has improved for ``early_stopping_patience`` epochs.
        early_stopping_patience
            Patience in epochs.
        kd_start_epoch
            First epoch with the distillation loss (the bank keys of epoch 0 come from untrained heads).
        warmup_epochs
            Epochs that train only the projection heads (InfoNCE) before the regression path starts,
            so that its soft labels are informative from its first step (``0``: joint from the start,
            as the paper). Counted within ``max_epochs``.
        augment
            Random flips and 90° rotations of training patches (end to end only).
        num_workers
            DataLoader workers reading patches (end to end only).
        **trainer_kwargs
            Passed to :class:`lightning.pytorch.Trainer`.

        Examples
        --------
        >>> model.train(max_epochs=50, train_indices="si_sampled")  # doctest: +SKIP
        >>> model.history_.tail()  # doctest: +SKIP
        """
        import lightning.pytorch as pl

        from .._nb._finetune import _trainer_accelerator
        from .._nb._finetune_module import augment as dihedral_augment

        if self._data is None:
            msg = "This SCR2Net was loaded without its training data; load it with SCR2Net.load(path, data) to train."
            raise RuntimeError(msg)
        mode = "end-to-end" if self.needs_images else "features"
        max_epochs = _DEFAULT_EPOCHS[mode] if max_epochs is None else int(max_epochs)
        if max_epochs < 1 or int(batch_size) < 2:
            msg = f"max_epochs must be ≥ 1 and batch_size ≥ 2, got {max_epochs!r} and {batch_size!r}."
            raise ValueError(msg)
        if optimizer not in OPTIMIZERS:
            msg = f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}."
            raise ValueError(msg)
        td = train_defaults(accelerator, devices, self.params_["seed"] if seed is None else seed)
        p = self.params_
        table = get_table(self._data, p["table_key"])
        rows = resolve_train_indices(table, train_indices)
        y_all = log1p_counts(table, self.genes_, p["layer"], rows).astype(np.float32)
        x_all, patches, items_all = self._inputs(self._data, table, rows)
        types_all, type_names = (None, [])
        if p["retrieval"] and self._cell_types_arg is None and self.cell_type_names_:
            msg = ("This model was trained with cell types from a SingleCellPrior or an array, which a model file does "
                   "not hold; load it with SCR2Net.load(path, data, cell_types=...) to train it further.")
            raise ValueError(msg)
        if p["retrieval"] and self._cell_types_arg is not None:
            types_all, type_names = _cell_types(table, self._cell_types_arg, rows, p["layer"])
        # positions in rows; validation spots are held out of the bank and of the gradient
        fit, val = split_train_validation(np.arange(rows.size), validation_size, early_stopping, td.seed)
        if fit.size < 2:
            msg = f"SCR2Net needs at least 2 training spots after the validation split, got {fit.size}."
            raise ValueError(msg)
        acc, precision = _trainer_accelerator(td.accelerator)
        device = resolve_device(td.accelerator)
        sub = (lambda a, idx: None if a is None else a[idx])  # noqa: E731
        if not self._stats_set:
            self._init_stats(sub(x_all, fit), patches, sub(items_all, fit), y_all[fit], batch_size, device, td.seed)
        self.module.cpu()
        self.module.set_bank(torch.from_numpy(y_all[fit]),
                             None if types_all is None else torch.from_numpy(types_all[fit]))
        train_ds = _Spots(sub(x_all, fit), patches, sub(items_all, fit), y_all[fit], np.arange(fit.size))
        gen = torch.Generator().manual_seed(td.seed)
        drop_last = len(train_ds) > batch_size and len(train_ds) % batch_size == 1  # no batch of one (PCC, BN)
        loaders = {"train_dataloaders": DataLoader(
            train_ds, batch_size=int(batch_size), shuffle=True, generator=gen, drop_last=drop_last,
            collate_fn=_Spots.collate, num_workers=num_workers, persistent_workers=num_workers > 0)}
        if val.size:
            loaders["val_dataloaders"] = DataLoader(
                _Spots(sub(x_all, val), patches, sub(items_all, val), y_all[val], None), batch_size=int(batch_size),
                collate_fn=_Spots.collate, num_workers=num_workers)
        plan = make_plan(self.module, weights=self.loss_weights, config=self.retrieval_config, lr=float(lr),
                         weight_decay=float(weight_decay), optimizer=optimizer, max_epochs=max_epochs,
                         lr_min_ratio=float(lr_min_ratio), augment=dihedral_augment if augment else None,
                         kd_start_epoch=int(kd_start_epoch), warmup_epochs=int(warmup_epochs),
                         patience=int(early_stopping_patience) if early_stopping else None)
        callbacks = list(trainer_kwargs.pop("callbacks", []))
        trainer_kwargs.setdefault("enable_progress_bar", settings.progress if progress is None else bool(progress))
        if not self.needs_images:
            precision = "32"  # a small MLP on features: full precision everywhere
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), quiet_lightning():
                torch.manual_seed(td.seed)
                trainer = pl.Trainer(
                    accelerator=acc, devices=td.devices, precision=precision,
                    max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                    enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, **trainer_kwargs)
                trainer.fit(plan, **loaders)
        finally:
            self.module.cpu()
        self.module.eval()
        self.module.refresh_bank()
        self.history_ = history_frame(plan.history)
        self.cell_type_names_ = list(type_names)
        self.train_indices_, self.validation_indices_ = rows[fit], rows[val]
        self.is_trained_ = True
        if self.needs_images:
            self._refresh_cache_key()
        last = plan.history[-1] if plan.history else {}
        self.best_epochs_ = {g: int(e) for g, e in plan.best_epoch.items() if e >= 0}
        logger.info("SCR2Net: %d epochs on %d spots (bank) + %d validation; best epochs %s%s",
                    len(plan.history), fit.size, val.size, self.best_epochs_ or "n/a (no validation)",
                    f", confident retrievals {last['train_mask']:.0%}" if "train_mask" in last else "")

    def _refresh_cache_key(self) -> None:
        from ...encoders._build import weights_fingerprint

        enc = self.module.encoder
        if hasattr(enc, "cache_key"):
            enc.cache_key = f"{enc.name}:scr2net:{weights_fingerprint(enc.net)}"

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def _run(self, ds: Dataset, batch_size: int, device: torch.device, what: str, *, mode: str = "regression",
             alpha: float = 0.5, progress: bool | None = False) -> np.ndarray:
        """Raw encoder features (``what='raw'``) or predictions (``'predict'``) over ``ds``, in eval mode."""
        m = self.module.to(device).eval()
        cfg = self.retrieval_config
        loader = DataLoader(ds, batch_size=batch_size, collate_fn=_Spots.collate)
        out = []
        try:
            for x in progress_bar(loader, desc="SCR2Net", total=len(loader), progress=progress):
                x = x.to(device)
                if what == "raw":
                    out.append((m.encoder(x) if m.encoder is not None else x).float().cpu())
                    continue
                f = m.features(x)
                reg = m.regress(f)
                ret = None
                if mode != "regression":
                    ret, _ = m.retrieve(f, k=cfg.k, n_types=cfg.n_types, threshold=cfg.threshold)
                out.append(PREDICT_MODES[mode](reg, ret, alpha).float().cpu())
        finally:
            self.module.cpu()
        return torch.cat(out).numpy()

    def predict(self, data: Any, *, mode: str = "regression", alpha: float = 0.5, table_key: str | None = None,
                batch_size: int = 1024, accelerator: str | None = None) -> ExpressionPrediction:
        """Predicted ``log1p`` expression of :attr:`genes_` for every spot of ``data``.

        Parameters
        ----------
        data
            Table with the model's features in ``.obsm`` (frozen features), or data with images
            (end to end). Its genes do not matter.
        mode
            ``'regression'`` (the regression path, as the paper), ``'retrieval'`` (mean profile of
            the filtered top-K training spots) or ``'blend'``.
        alpha
            Weight of the regression path in ``'blend'``.
        table_key
            Table of a SpatialData object (``None``: the training one).
        batch_size
            Spots per forward pass.
        accelerator
            Device; ``None`` uses :attr:`stimg.settings.accelerator`.

        Returns
        -------
        :class:`~stimg.tl.ExpressionPrediction` with ``scale='log1p'``.

        Examples
        --------
        >>> pred = model.predict(adata, mode="blend", alpha=0.5)  # doctest: +SKIP
        """
        check_trained(self)
        if mode not in PREDICT_MODES:
            msg = f"mode must be one of {sorted(PREDICT_MODES)}, got {mode!r}."
            raise ValueError(msg)
        if mode != "regression" and not self.params_["retrieval"]:
            msg = f"mode={mode!r} needs the retrieval path; this model was built with retrieval=False."
            raise ValueError(msg)
        if not 0.0 <= float(alpha) <= 1.0:
            msg = f"alpha must be in [0, 1], got {alpha!r}."
            raise ValueError(msg)
        tk = self.params_["table_key"] if table_key is None else table_key
        table = get_table(data, tk)
        check_nonempty(table.n_obs, "The table to predict", "Pass a table with at least one spot.")
        if not self.needs_images:
            check_embedding(table, self.provenance_)
        x, patches, items = self._inputs(data, table, np.arange(table.n_obs), tk)
        ds = _Spots(x, patches, items, None, None)
        mean = self._run(ds, int(batch_size), resolve_device(accelerator), "predict", mode=mode, alpha=float(alpha),
                         progress=None)
        return ExpressionPrediction(mean=mean, var_names=list(self.genes_), scale="log1p")

    @torch.inference_mode()
    def get_projections(self, adata: Any, *, table_key: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """L2-normalised image and expression embeddings in the shared space (frozen features only).

        The expression side is computed where the table has counts of the model's genes (``None`` otherwise).

        Examples
        --------
        >>> z_img, z_expr = model.get_projections(adata)  # doctest: +SKIP
        """
        check_trained(self)
        if not self.params_["retrieval"] or self.needs_images:
            msg = "get_projections needs a model with the retrieval path trained on frozen features."
            raise ValueError(msg)
        table = get_table(adata, self.params_["table_key"] if table_key is None else table_key)
        check_embedding(table, self.provenance_)
        x, _, _ = self._inputs(adata, table, np.arange(table.n_obs))
        m = self.module.eval()
        zi = l2_normalize(m.image_embedding(m.features(torch.from_numpy(x)))).numpy()
        ze = None
        if pd.Index(self.genes_).isin(table.var_names).all():
            y = log1p_counts(table, self.genes_, self.params_["layer"]).astype(np.float32)
            ze = l2_normalize(m.expression_embedding(torch.from_numpy(y))).numpy()
        return zi, ze

    # ------------------------------------------------------------------ persistence
    def _get_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        p = dict(self.params_)
        if self.needs_images and p["encoder"] is None:
            p["encoder"] = None  # a custom module: pass it again to load()
        header = {
            "params": p, "genes": list(self.genes_), "provenance": self.provenance_,
            "needs_images": bool(self.needs_images), "n_input": int(self.module.feature_mean.shape[0]),
            "cell_type_names": list(self.cell_type_names_),
            "history": None if self.history_ is None else self.history_.to_dict(orient="list"),
            "train_indices": None if self.train_indices_ is None else [int(i) for i in self.train_indices_],
            "validation_indices": None if self.validation_indices_ is None else [int(i) for i in self.validation_indices_],
        }
        tensors = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        return header, tensors

    @classmethod
    def _from_state(cls, header: dict[str, Any], tensors: dict[str, Any], adata: Any = None, *,
                    encoder: nn.Module | None = None, cell_types: Any = None, **kwargs: Any) -> SCR2Net:
        p = dict(header["params"])
        needs_images = bool(header["needs_images"])
        if needs_images and p["encoder"] is None and encoder is None:
            msg = "This model was trained with a custom torch.nn.Module encoder; pass the same module as encoder=."
            raise ValueError(msg)
        model = cls.__new__(cls)
        model.params_, model.genes_ = p, list(header["genes"])
        model._data, model._cell_types_arg = adata, p.get("cell_types") if cell_types is None else cell_types
        model.provenance_, model.needs_images = header["provenance"], needs_images
        enc = None
        if needs_images:
            enc, _ = model._build_encoder(encoder if encoder is not None else p["encoder"], pretrained=False)
        model.module = model._build_module(int(header["n_input"]), enc)
        state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
        for name in ("bank_values", "bank_types", "bank_keys"):  # the bank's size is the file's
            setattr(model.module, name, torch.empty_like(state[name]))
        model.module.load_state_dict(state)
        model.module.eval()
        model.history_ = None if header.get("history") is None else pd.DataFrame(header["history"])
        model.cell_type_names_ = list(header.get("cell_type_names") or [])
        ti, vi = header.get("train_indices"), header.get("validation_indices")
        model.train_indices_ = None if ti is None else np.asarray(ti, dtype=np.int64)
        model.validation_indices_ = None if vi is None else np.asarray(vi, dtype=np.int64)
        model.is_trained_, model._stats_set = True, True
        if needs_images:
            model._refresh_cache_key()
        return model

