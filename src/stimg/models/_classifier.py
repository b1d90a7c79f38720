"""SpotClassifier: spot labels from image embeddings, optionally fused with expression (ActiveVisium).

A lean torch loop (no Lightning): a round of active annotation trains on tens to hundreds of
labelled spots, which takes well under a second on one CPU thread, while a Lightning Trainer
would spend longer starting up than training.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._docs import d
from .._logging import logger
from .._utils import progress_bar, resolve_device
from .._validate import assert_key_in, check_matrix
from ._base import (
    ModelIO,
    check_embedding,
    check_trained,
    embedding_provenance,
    resolve_train_indices,
    train_defaults,
)


class SpotNet(nn.Module):
    """Morphology projection (+ expression projection and fusion) → one-hidden-layer classifier.

    ``f_morph = LeakyReLU(W·x_img)`` (``n_hidden``); with an expression branch
    ``f_ge = LeakyReLU(W·x_expr)`` (``n_hidden``) and a fusion layer
    ``LayerNorm → Linear(n_fusion) → LeakyReLU → Dropout`` on ``[f_morph, f_ge]``; then the
    classifier ``Linear(n_hidden) → LeakyReLU → Dropout → Linear(n_classes)`` (ActiveVisium §3.1).
    Inputs are standardised with stored means and scales.
    """

    def __init__(self, n_image: int, n_expression: int, n_classes: int, *, n_hidden: int = 128,
                 n_fusion: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.n_image, self.n_expression, self.n_classes = int(n_image), int(n_expression), int(n_classes)
        self.n_hidden, self.n_fusion, self.dropout = int(n_hidden), int(n_fusion), float(dropout)
        self.register_buffer("image_mean", torch.zeros(n_image))
        self.register_buffer("image_scale", torch.ones(n_image))
        self.morph = nn.Sequential(nn.Linear(n_image, n_hidden), nn.LeakyReLU())
        if n_expression:
            self.register_buffer("expression_mean", torch.zeros(n_expression))
            self.register_buffer("expression_scale", torch.ones(n_expression))
            self.expr = nn.Sequential(nn.Linear(n_expression, n_hidden), nn.LeakyReLU())
            self.fusion = nn.Sequential(nn.LayerNorm(2 * n_hidden), nn.Linear(2 * n_hidden, n_fusion),
                                        nn.LeakyReLU(), nn.Dropout(dropout))
            n_latent = n_fusion
        else:
            n_latent = n_hidden
        self.hidden = nn.Sequential(nn.Linear(n_latent, n_hidden), nn.LeakyReLU(), nn.Dropout(dropout))
        self.out = nn.Linear(n_hidden, n_classes)

    def latent(self, x_image: torch.Tensor, x_expression: torch.Tensor | None = None) -> torch.Tensor:
        """The representation the classifier sees (morphology, or fused morphology and expression)."""
        h = self.morph((x_image - self.image_mean) / self.image_scale)
        if self.n_expression:
            g = self.expr((x_expression - self.expression_mean) / self.expression_scale)
            h = self.fusion(torch.cat([h, g], dim=1))
        return h

    def forward(self, x_image: torch.Tensor, x_expression: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits."""
        return self.out(self.hidden(self.latent(x_image, x_expression)))

    def add_classes(self, n_new: int, generator: torch.Generator | None = None) -> None:
        """Grow the output layer by ``n_new`` classes, keeping the weights of the existing ones."""
        old = self.out
        new = nn.Linear(old.in_features, old.out_features + n_new)
        with torch.no_grad():
            bound = 1 / np.sqrt(old.in_features)
            new.weight.uniform_(-bound, bound, generator=generator)
            new.bias.uniform_(-bound, bound, generator=generator)
            new.weight[: old.out_features] = old.weight
            new.bias[: old.out_features] = old.bias
        self.out = new.to(old.weight.device)
        self.n_classes += n_new


def class_weights(y: np.ndarray, n_classes: int, *, balanced: bool = True) -> np.ndarray:
    """Inverse class frequency ``n / (K_present · n_k)`` (0 for classes without labelled spots).

    ``balanced=False``: 1 for every class with labelled spots (plain cross-entropy).
    """
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present]) if balanced else 1.0
    return w.astype(np.float32)


def stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(fit, validation)`` of ``y``: ``ceil(fraction · n_k)`` spots of each class held out.

    Nothing is held out (``validation`` empty) when ``fraction`` is 0 or a class has fewer
    than two spots, so that every class stays in the training set.
    """
    y = np.asarray(y)
    allpos = np.arange(len(y))
    classes, counts = np.unique(y, return_counts=True)
    if fraction <= 0 or (counts < 2).any():
        return allpos, allpos[:0]
    rng = np.random.default_rng([int(seed), 104729])
    val = [rng.permutation(np.flatnonzero(y == c))[: int(np.ceil(fraction * k))]
           for c, k in zip(classes, counts, strict=True)]
    val = np.sort(np.concatenate(val))
    return np.setdiff1d(allpos, val), val


def _label_strings(col: pd.Series, labels_key: str) -> pd.Series:
    """Labels as strings with missing values kept missing; empty strings are refused."""
    s = col.astype(object).where(col.notna(), None)
    s = s.map(lambda v: v if v is None else str(v))
    empty = s.map(lambda v: v is not None and v.strip() == "")
    if empty.any():
        msg = (f".obs[{labels_key!r}] has {int(empty.sum())} empty-string labels (e.g. spot {s.index[empty.to_numpy()][0]!r}); "
               "mark unlabelled spots with a missing value (None/NaN), not an empty string.")
        raise ValueError(msg)
    return s


class SpotClassifier(ModelIO):
    """Spot classifier for active annotation: MLP on image embeddings, optional expression branch.

    ActiveVisium's model: the image embedding (e.g. ``'X_efficientnet_lite0'`` from
    :func:`stimg.pp.embed`) is projected to ``n_hidden`` units (LeakyReLU); with ``expression``
    a second branch projects the spot's expression and a fusion layer combines both; a
    classifier with one hidden layer of ``n_hidden`` units gives the class probabilities.
    Training minimises class-weighted cross-entropy, the weights being the inverse class
    frequencies of the labelled spots, recomputed at every :meth:`train` call; a second call
    continues from the current weights (warm start). Trains in about a second on one CPU thread.

    Parameters
    ----------
    adata
        Table with the embedding in ``.obsm`` and the labels in ``.obs[labels_key]``.
    labels_key
        ``.obs`` column of labels; a missing value (``None``/``NaN``) marks an unlabelled spot.
    embedding_key
        ``.obsm`` key of the image embedding.
    expression
        ``False``: image only. ``True``: the ``n_hvg`` highly variable genes of ``adata``
        (``seurat_v3`` on counts), normalised and log-transformed. A string: an ``.obsm`` key of
        an expression embedding, e.g. ``'X_harmony'`` from :func:`stimg.pp.integrate_expression`
        (use this to transfer the classifier to another section).
    layer
        Raw-count layer for ``expression=True``; ``None`` uses ``X``.
    n_hvg
        Highly variable genes for ``expression=True``.
    classes
        Class names known in advance (order kept); classes first seen in the labels are appended.
    n_hidden
        Width of the projections and of the classifier's hidden layer.
    n_fusion
        Width of the fusion layer.
    dropout
        Dropout of the fusion and hidden layers.
    seed
        Seed of the weight initialisation and default seed of :meth:`train`; ``None`` uses
        :attr:`stimg.settings.seed`.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> adata = si.datasets.synthetic(200, 20, image=False, as_anndata=True)
    >>> adata.obs["label"] = adata.obs["cell_type"].astype(object)
    >>> adata.obs.loc[adata.obs_names[40:], "label"] = None  # 40 labelled spots
    >>> model = si.models.SpotClassifier(adata, "label", embedding_key="X_synthetic")
    >>> model.train(max_epochs=20)
    >>> model.predict().shape
    (200,)
    """

    def __init__(self, adata: Any, labels_key: str, *, embedding_key: str | None = None,
                 expression: bool | str = False, layer: str | None = None, n_hvg: int = 1000,
                 classes: Sequence[str] | None = None, n_hidden: int = 128, n_fusion: int = 256,
                 dropout: float = 0.1, seed: int | None = None) -> None:
        from .._spatial import get_table

        adata = get_table(adata)
        if embedding_key is None:
            msg = (f"Pass embedding_key=, the .obsm key of the image embedding (available: {list(adata.obsm)}); "
                   "compute one with si.pp.embed.")
            raise ValueError(msg)
        assert_key_in(adata.obsm, embedding_key, where="adata.obsm", hint="Compute image embeddings with si.pp.embed.")
        img = check_matrix(adata.obsm[embedding_key], f"adata.obsm[{embedding_key!r}]", n_obs=adata.n_obs)
        if not isinstance(expression, bool | str):
            msg = f"expression must be False, True (HVGs) or an .obsm key, got {type(expression).__name__}."
            raise TypeError(msg)
        for name, v in (("n_hidden", n_hidden), ("n_fusion", n_fusion), ("n_hvg", n_hvg)):
            if int(v) < 1:
                msg = f"{name} must be ≥ 1, got {v!r}."
                raise ValueError(msg)
        if not 0 <= float(dropout) < 1:
            msg = f"dropout must be in [0, 1), got {dropout!r}."
            raise ValueError(msg)
        self.labels_key = str(labels_key)
        self.embedding_key = embedding_key
        self.provenance_ = embedding_provenance(adata, embedding_key)
        self.layer, self.n_hvg = layer, int(n_hvg)
        self.seed = int(train_defaults(seed=seed).seed)
        self.init_params_ = {"n_hidden": int(n_hidden), "n_fusion": int(n_fusion), "dropout": float(dropout)}
        # expression features
        if expression is True:
            from ..pp._integrate import hvg_genes

            self.expression_ = {"kind": "hvg", "genes": hvg_genes(adata, self.n_hvg, layer=layer), "layer": layer}
        elif isinstance(expression, str):
            assert_key_in(adata.obsm, expression, where="adata.obsm",
                          hint="Compute it with si.pp.integrate_expression, or pass expression=True for HVGs.")
            self.expression_ = {"kind": "obsm", "key": expression,
                                "dim": int(np.shape(adata.obsm[expression])[1])}
        else:
            self.expression_ = None
        expr = self._expression(adata)
        self.classes_: list[str] = [] if classes is None else [str(c) for c in classes]
        if len(set(self.classes_)) != len(self.classes_):
            msg = f"classes has duplicates: {self.classes_}."
            raise ValueError(msg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.module = SpotNet(img.shape[1], 0 if expr is None else expr.shape[1], max(len(self.classes_), 1),
                                  **self.init_params_)
        with torch.no_grad():  # standardise with the statistics of every spot of the section (no labels used)
            self.module.image_mean.copy_(torch.as_tensor(img.mean(0), dtype=torch.float32))
            self.module.image_scale.copy_(torch.as_tensor(np.maximum(img.std(0), 1e-6), dtype=torch.float32))
            if expr is not None:
                self.module.expression_mean.copy_(torch.as_tensor(expr.mean(0), dtype=torch.float32))
                self.module.expression_scale.copy_(torch.as_tensor(np.maximum(expr.std(0), 1e-6), dtype=torch.float32))
        self.adata = adata
        self.is_trained_ = False
        self.n_rounds_ = 0
        self.history_: list[dict[str, Any]] = []
        self.class_weights_: np.ndarray | None = None

    def __repr__(self) -> str:
        e = self.expression_
        expr = "image only" if e is None else (f"+ {len(e['genes'])} HVGs" if e["kind"] == "hvg" else f"+ obsm[{e['key']!r}]")
        state = f"trained {self.n_rounds_} round(s), {len(self.classes_)} classes" if self.is_trained_ else "untrained"
        return f"SpotClassifier({self.embedding_key!r} {expr}, labels {self.labels_key!r}) [{state}]"

    # ------------------------------------------------------------------ features
    def _expression(self, adata: Any) -> np.ndarray | None:
        e = self.expression_
        if e is None:
            return None
        if e["kind"] == "hvg":
            from ..pp._integrate import lognorm_expression

            return lognorm_expression(adata, e["genes"], layer=e["layer"])
        assert_key_in(adata.obsm, e["key"], where="adata.obsm",
                      hint="Integrate the new section with the training one (si.pp.integrate_expression) first.")
        return check_matrix(adata.obsm[e["key"]], f"adata.obsm[{e['key']!r}]", n_obs=adata.n_obs,
                            n_cols=e["dim"]).astype(np.float32)

    def _inputs(self, adata: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if adata is not self.adata:
            check_embedding(adata, self.provenance_, embedding_key=self.embedding_key)
        img = check_matrix(adata.obsm[self.embedding_key], f"adata.obsm[{self.embedding_key!r}]", n_obs=adata.n_obs,
                           n_cols=self.module.n_image).astype(np.float32)
        expr = self._expression(adata)
        return torch.from_numpy(img), None if expr is None else torch.from_numpy(expr)

    def _table(self, adata: Any) -> Any:
        if adata is None:
            if self.adata is None:
                msg = "This SpotClassifier has no table attached; pass adata= (a table with the same features)."
                raise ValueError(msg)
            return self.adata
        from .._spatial import get_table

        return get_table(adata)

    def attach(self, adata: Any) -> SpotClassifier:
        """A copy of this model bound to another table (e.g. another section), weights copied.

        Training the copy (a warm start on the new section) leaves this model unchanged.

        Parameters
        ----------
        adata
            Table with the same kind of image embedding (and expression features).

        Returns
        -------
        The new :class:`SpotClassifier`.
        """
        from .._spatial import get_table

        adata = get_table(adata)
        check_embedding(adata, self.provenance_, embedding_key=self.embedding_key)
        self._expression(adata)  # raises when the expression features are missing
        new = copy.copy(self)
        new.module = copy.deepcopy(self.module)
        new.history_ = list(self.history_)
        new.classes_ = list(self.classes_)
        new.adata = adata
        return new

    # ------------------------------------------------------------------ training
    def _labels(self, adata: Any) -> pd.Series:
        assert_key_in(adata.obs, self.labels_key, where="adata.obs",
                      hint="Store the labels there (missing value = unlabelled), e.g. with si.io.read_loupe.")
        return _label_strings(adata.obs[self.labels_key], self.labels_key)

    def _grow_classes(self, labels: Sequence[str], gen: torch.Generator) -> None:
        new = [c for c in pd.unique(np.asarray(labels, dtype=object)) if c not in self.classes_]
        if new:
            self.classes_ = [*self.classes_, *sorted(new)]
        extra = len(self.classes_) - self.module.n_classes
        if extra > 0:
            self.module.add_classes(extra, gen)

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
        batch_size: int = 16,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warm_start: bool = True,
        validation_size: float = 0.0,
        class_weight: str | None = "balanced",
    ) -> None:
        """Fit on the labelled spots with class-weighted cross-entropy (Adam, minibatches).

        Class weights (``class_weight``) are the inverse class frequencies of the training spots, recomputed at
        every call. A second call continues from the current weights (``warm_start``) and
        grows the output layer when new classes appear.

        Parameters
        ----------
        %(max_epochs)s
            Default 50 (ActiveVisium).
        train_indices
            Spots to train on: integer positions, a boolean mask or a boolean ``.obs`` column.
            ``None`` uses every labelled spot. Every selected spot must be labelled.
        %(accelerator)s
        devices
            One device: ``'auto'``, ``1`` or ``[index]``; ``None`` uses :attr:`stimg.settings.devices`.
        %(seed)s
        %(progress)s
        batch_size
            Minibatch size.
        lr
            Adam learning rate.
        weight_decay
            L2 penalty.
        warm_start
            Continue from the current weights; ``False`` re-initialises them. In simulated
            annotation on HER2ST (10 seeds) re-initialising every round changed the weighted F1 of
            rounds 2–5 by +0.003 ± 0.002 (least-confidence) and +0.006 ± 0.001 (random) on C2–C6
            and A1 together, but by −0.004 ± 0.002 for least-confidence on A1: no consistent gain,
            so ActiveVisium's warm start stays the default.
        class_weight
            ``'balanced'`` (ActiveVisium): inverse class frequencies of the training spots, so
            that rare classes count as much as common ones. ``None``: plain cross-entropy, the
            model keeps the class mix of the labelled spots. In simulated annotation on HER2ST
            (10 seeds) ``None`` raised least-confidence's gain over random at round 2 on A1
            (+0.041 vs +0.021) but left the weighted F1 of both rules almost unchanged
            (+0.002 ± 0.002, +0.001 ± 0.001; ``benchmarks/results/annotation_her2st.md``).
        validation_size
            ActiveVisium's model selection: hold out this fraction of each class's training spots
            (at least one; drawn with ``seed``), train on the rest and keep the weights of the
            epoch with the lowest validation loss (the same class-weighted cross-entropy). Used
            only when every class has at least two training spots; otherwise all spots are
            trained on and the final weights kept (logged). ``0`` (default): no hold-out. The
            paper uses this once many spots are labelled; on HER2ST's small sections (simulated
            annotation, 10 seeds, ``benchmarks/results/annotation_her2st.md``) ``0.1`` lowered the
            weighted F1 of rounds 2–5 by 0.04 (patch features) and 0.025 (context features).

        Examples
        --------
        >>> model.train(max_epochs=50, train_indices="labelled")  # doctest: +SKIP
        """
        from .._settings import settings
        from ._sampling._baselines import torch_threads

        start = time.perf_counter()
        td = train_defaults(accelerator, devices, self.seed if seed is None else seed)
        max_epochs = 50 if max_epochs is None else int(max_epochs)
        if max_epochs < 1 or int(batch_size) < 1 or not lr > 0 or weight_decay < 0:
            msg = (f"max_epochs and batch_size must be ≥ 1, lr > 0, weight_decay ≥ 0; got {max_epochs}, {batch_size}, "
                   f"{lr}, {weight_decay}.")
            raise ValueError(msg)
        if class_weight not in ("balanced", None):
            msg = f"class_weight must be 'balanced' or None, got {class_weight!r}."
            raise ValueError(msg)
        if isinstance(validation_size, bool) or not 0 <= float(validation_size) <= 0.5:
            msg = (f"validation_size must be a fraction in [0, 0.5] of each class's training spots, got "
                   f"{validation_size!r}.")
            raise ValueError(msg)
        device = self._device(td.accelerator, td.devices)
        adata = self.adata
        labels = self._labels(adata)
        labelled = labels.notna().to_numpy()
        if train_indices is None:
            if not labelled.any():
                msg = f"No spot is labelled in .obs[{self.labels_key!r}]; label some spots (e.g. si.io.read_loupe) first."
                raise ValueError(msg)
            rows = np.flatnonzero(labelled)
        else:
            rows = resolve_train_indices(adata, train_indices)
            if bad := int((~labelled[rows]).sum()):
                names = list(adata.obs_names[rows[~labelled[rows]]][:5])
                msg = (f"{bad} of the selected training spots have no label in .obs[{self.labels_key!r}] "
                       f"(e.g. {names}); select labelled spots only.")
                raise ValueError(msg)
        y_str = labels.to_numpy()[rows]
        present = pd.unique(y_str)
        if len(present) < 2:
            msg = (f"The {len(rows)} training spots carry a single class ({present[0]!r}); label spots of at least "
                   "two classes before training.")
            raise ValueError(msg)
        gen = torch.Generator().manual_seed(td.seed)
        if not warm_start or not self.is_trained_:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(td.seed)
                n_cls = max(len(self.classes_), 1)
                fresh = SpotNet(self.module.n_image, self.module.n_expression, n_cls, **self.init_params_)
            fresh.load_state_dict({k: v for k, v in self.module.state_dict().items() if "mean" in k or "scale" in k},
                                  strict=False)
            self.module = fresh
        self._grow_classes(y_str, gen)
        cls_index = {c: i for i, c in enumerate(self.classes_)}
        y = torch.as_tensor(np.array([cls_index[c] for c in y_str]), dtype=torch.long)
        fit, val = stratified_holdout(y.numpy(), float(validation_size), td.seed)
        if float(validation_size) > 0 and not val.size:
            logger.info("SpotClassifier: a class has fewer than two training spots; training on all %d spots, "
                        "keeping the final weights", len(rows))
        # from the spots trained on (the hold-out leaves every class at least one of them)
        weights = class_weights(y.numpy()[fit], len(self.classes_), balanced=class_weight == "balanced")
        if missing := [c for c, w in zip(self.classes_, weights, strict=True) if w == 0]:
            logger.info("SpotClassifier: no labelled spot of class(es) %s this round", missing)
        x_img, x_expr = self._inputs(adata)
        x_img = x_img[rows].to(device)
        x_expr = None if x_expr is None else x_expr[rows].to(device)
        y = y.to(device)
        module = self.module.to(device)
        loss_fn = nn.CrossEntropyLoss(weight=torch.as_tensor(weights, device=device))
        opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
        fit_t, val_t = torch.as_tensor(fit, device=device), torch.as_tensor(val, device=device)
        n = len(fit)
        losses, best = [], (np.inf, -1, None)
        show = settings.progress if progress is None else progress
        with torch_threads(len(rows)), torch.random.fork_rng(devices=[]):
            torch.manual_seed(td.seed)
            for epoch in progress_bar(range(max_epochs), desc="SpotClassifier", progress=show, leave=False):
                module.train()
                perm = fit_t[torch.randperm(n, generator=gen).to(device)]
                tot = 0.0
                for i in range(0, n, int(batch_size)):
                    b = perm[i:i + int(batch_size)]
                    opt.zero_grad()
                    loss = loss_fn(module(x_img[b], None if x_expr is None else x_expr[b]), y[b])
                    loss.backward()
                    opt.step()
                    tot += float(loss.detach()) * len(b)
                losses.append(tot / n)
                if val.size:
                    module.eval()
                    with torch.no_grad():
                        v = float(loss_fn(module(x_img[val_t], None if x_expr is None else x_expr[val_t]), y[val_t]))
                    if v < best[0]:
                        best = (v, epoch, {k: t.detach().clone() for k, t in module.state_dict().items()})
            module.eval()
        if not np.isfinite(losses[-1]):
            msg = "Training diverged (non-finite loss); lower lr= or check the embedding for extreme values."
            raise FloatingPointError(msg)
        if best[2] is not None:
            module.load_state_dict(best[2])
        self.module = module.cpu()
        self.is_trained_ = True
        self.n_rounds_ += 1
        self.class_weights_ = weights
        self.train_indices_ = rows
        self.validation_indices_ = rows[val]
        secs = time.perf_counter() - start
        self.history_.append({"round": self.n_rounds_, "n_train": int(n), "n_validation": int(val.size),
                              "n_classes": int(len(present)), "epochs": max_epochs, "loss": float(losses[-1]),
                              "best_epoch": int(best[1]) + 1 if val.size else max_epochs,
                              "validation_loss": float(best[0]) if val.size else None, "seconds": float(secs)})
        logger.debug("SpotClassifier: %d spots, %d classes, %d epochs, loss %.3f (%.2fs)", n, len(present),
                     max_epochs, losses[-1], secs)

    @staticmethod
    def _device(accelerator: str, devices: Any) -> torch.device:
        dev = resolve_device(accelerator)
        if isinstance(devices, list | tuple):
            if len(devices) != 1:
                msg = f"SpotClassifier trains on one device; got devices={devices!r}."
                raise ValueError(msg)
            if dev.type == "cuda":
                dev = torch.device(f"cuda:{int(devices[0])}")
        elif devices not in ("auto", 1, "1", None, -1):
            msg = f"SpotClassifier trains on one device; got devices={devices!r} (use 1, 'auto' or [index])."
            raise ValueError(msg)
        return dev

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def _forward(self, adata: Any, what: str) -> np.ndarray:
        x_img, x_expr = self._inputs(adata)
        self.module.eval()
        if what == "latent":
            return self.module.latent(x_img, x_expr).numpy()
        logits = self.module(x_img, x_expr)[:, : len(self.classes_)]
        return torch.softmax(logits, dim=1).numpy()

    def predict_proba(self, adata: Any = None) -> pd.DataFrame:
        """Class probabilities of every spot.

        Parameters
        ----------
        adata
            Table with the same features (another section: the image embedding of the same
            encoder, and the expression features); ``None`` uses the training table.

        Returns
        -------
        DataFrame (spots × classes), rows summing to 1.

        Examples
        --------
        >>> proba = model.predict_proba(other_section)  # doctest: +SKIP
        """
        check_trained(self, "predicting")
        adata = self._table(adata)
        p = self._forward(adata, "proba")
        return pd.DataFrame(p, index=adata.obs_names.copy(), columns=pd.Index(self.classes_, dtype=object))

    def predict(self, adata: Any = None) -> pd.Series:
        """Most probable class of every spot (categorical, categories = :attr:`classes_`).

        Parameters
        ----------
        adata
            Table with the same features; ``None`` uses the training table.

        Returns
        -------
        Categorical Series indexed like ``.obs``.
        """
        p = self.predict_proba(adata)
        return pd.Series(pd.Categorical.from_codes(p.to_numpy().argmax(1), categories=self.classes_),
                         index=p.index, name="prediction")

    def get_latent(self, adata: Any = None) -> np.ndarray:
        """The representation fed to the classifier's hidden layer (used for diverse selection).

        Parameters
        ----------
        adata
            Table with the same features; ``None`` uses the training table.

        Returns
        -------
        ``(n_obs, n_hidden)`` array (``n_fusion`` columns with an expression branch).
        """
        check_trained(self, "computing the latent representation")
        return self._forward(self._table(adata), "latent")

    # ------------------------------------------------------------------ persistence
    def _get_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        header = {
            "labels_key": self.labels_key, "embedding_key": self.embedding_key, "provenance": self.provenance_,
            "expression": self.expression_, "layer": self.layer, "n_hvg": self.n_hvg, "seed": self.seed,
            "init_params": self.init_params_, "classes": self.classes_, "n_image": self.module.n_image,
            "n_expression": self.module.n_expression, "n_out": self.module.n_classes, "n_rounds": self.n_rounds_,
            "history": self.history_,
            "class_weights": None if self.class_weights_ is None else [float(w) for w in self.class_weights_],
        }
        return header, {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    @classmethod
    def _from_state(cls, header: dict[str, Any], tensors: dict[str, Any], adata: Any = None,
                    **kwargs: Any) -> SpotClassifier:
        if kwargs:
            msg = f"SpotClassifier.load takes no options {sorted(kwargs)}."
            raise TypeError(msg)
        obj = cls.__new__(cls)
        obj.labels_key, obj.embedding_key = header["labels_key"], header["embedding_key"]
        obj.provenance_, obj.expression_ = header["provenance"], header["expression"]
        obj.layer, obj.n_hvg, obj.seed = header["layer"], header["n_hvg"], header["seed"]
        obj.init_params_, obj.classes_ = header["init_params"], list(header["classes"])
        obj.module = SpotNet(header["n_image"], header["n_expression"], header["n_out"], **obj.init_params_)
        obj.module.load_state_dict(tensors)
        obj.module.eval()
        obj.n_rounds_, obj.history_ = header["n_rounds"], list(header["history"])
        cw = header.get("class_weights")
        obj.class_weights_ = None if cw is None else np.asarray(cw, dtype=np.float32)
        obj.is_trained_ = True
        obj.adata = None
        if adata is not None:
            from .._spatial import get_table

            adata = get_table(adata)
            check_embedding(adata, obj.provenance_, embedding_key=obj.embedding_key)
            obj._expression(adata)
            obj.adata = adata
        return obj
