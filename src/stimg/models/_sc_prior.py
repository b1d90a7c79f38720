"""Single-cell priors: expression embeddings shared by spots and cells, nearest-cell types.

The default gene encoder is an scVI model (scvi-tools) trained on the single-cell reference
over the genes it shares with the spots; spots are embedded as queries of the same encoder
(:meth:`scvi.model.SCVI.get_latent_representation` on the spot counts reindexed to the same
genes). Any other encoder (scGPT, Geneformer, …) plugs in through :class:`GeneEncoder` or a
plain callable ``adata -> (n_obs, d) array``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._logging import logger
from .._validate import assert_key_in, check_matrix


@runtime_checkable
class GeneEncoder(Protocol):
    """Embeds expression profiles (cells or spots) into one space.

    ``fit`` sees the reference restricted to the shared genes (raw counts in ``X``);
    ``transform`` gets any AnnData over the same genes, in the same order.
    """

    def fit(self, reference: AnnData) -> GeneEncoder: ...

    def transform(self, adata: AnnData) -> np.ndarray: ...


class CallableEncoder:
    """Wrap a pre-trained ``f(adata) -> (n_obs, d)`` callable as a :class:`GeneEncoder` (``fit`` is a no-op)."""

    def __init__(self, func: Callable[[AnnData], np.ndarray]) -> None:
        self.func = func

    def fit(self, reference: AnnData) -> CallableEncoder:
        return self

    def transform(self, adata: AnnData) -> np.ndarray:
        return np.asarray(self.func(adata), dtype=np.float32)


def _log1p_cp10k(x) -> np.ndarray:
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    x = x.astype(np.float64)
    lib = x.sum(1, keepdims=True)
    return np.log1p(x / np.maximum(lib, 1.0) * 1e4).astype(np.float32)


class PCAGeneEncoder:
    """Light encoder: library-size normalise (10⁴), log1p, PCA fitted on the reference.

    Parameters
    ----------
    n_comps
        Components.
    seed
        Random seed of the PCA solver.
    """

    def __init__(self, n_comps: int = 30, *, seed: int = 0) -> None:
        self.n_comps, self.seed = int(n_comps), int(seed)

    def fit(self, reference: AnnData) -> PCAGeneEncoder:
        from sklearn.decomposition import PCA

        x = _log1p_cp10k(reference.X)
        self.pca_ = PCA(min(self.n_comps, *x.shape), random_state=self.seed).fit(x)
        return self

    def transform(self, adata: AnnData) -> np.ndarray:
        return self.pca_.transform(_log1p_cp10k(adata.X)).astype(np.float32)


class ScviGeneEncoder:
    """scVI trained on the reference; spots are embedded as queries (latent means).

    Parameters
    ----------
    n_latent
        Latent dimensions.
    n_top_genes
        Highly variable genes of the reference (``seurat_v3`` on counts) to train on;
        ``None`` uses all shared genes.
    max_epochs
        Training epochs.
    accelerator
        Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"``).
    seed
        ``scvi.settings.seed``.
    """

    def __init__(self, n_latent: int = 10, *, n_top_genes: int | None = 2000, max_epochs: int = 200,
                 accelerator: str = "auto", seed: int = 0) -> None:
        self.n_latent, self.n_top_genes, self.max_epochs = int(n_latent), n_top_genes, int(max_epochs)
        self.accelerator, self.seed = accelerator, int(seed)

    def fit(self, reference: AnnData) -> ScviGeneEncoder:
        import scvi

        from ._nb._training import quiet_lightning

        with quiet_lightning():
            scvi.settings.seed = self.seed
        ref = AnnData(X=sp.csr_matrix(reference.X, dtype=np.float32), var=pd.DataFrame(index=reference.var_names))
        if self.n_top_genes is not None and ref.n_vars > self.n_top_genes:
            import scanpy as sc

            try:
                hv = sc.pp.highly_variable_genes(ref, n_top_genes=self.n_top_genes, flavor="seurat_v3", inplace=False)
                keep = hv["highly_variable"].to_numpy()
            except Exception:  # noqa: BLE001 - skmisc missing or loess failure: fall back to variance
                v = np.asarray(ref.X.power(2).mean(0)).ravel() - np.asarray(ref.X.mean(0)).ravel() ** 2
                keep = np.zeros(ref.n_vars, bool)
                keep[np.argsort(-v)[: self.n_top_genes]] = True
            ref = ref[:, keep].copy()
        self.genes_ = ref.var_names
        scvi.model.SCVI.setup_anndata(ref)
        self.model_ = scvi.model.SCVI(ref, n_latent=self.n_latent)
        with quiet_lightning():
            self.model_.train(max_epochs=self.max_epochs, accelerator=self.accelerator, enable_progress_bar=False,
                              enable_model_summary=False)
        return self

    def transform(self, adata: AnnData) -> np.ndarray:
        import logging

        x = adata[:, self.genes_].X
        q = AnnData(X=sp.csr_matrix(x, dtype=np.float32), var=pd.DataFrame(index=self.genes_))
        scvi_logger = logging.getLogger("scvi")
        old = scvi_logger.level
        scvi_logger.setLevel(logging.WARNING)  # "Input AnnData not setup with scvi-tools ..." on every query
        try:
            return np.asarray(self.model_.get_latent_representation(q), dtype=np.float32)
        finally:
            scvi_logger.setLevel(old)


def _make_encoder(encoder: str | GeneEncoder | Callable, seed: int) -> Any:
    if isinstance(encoder, str):
        if encoder == "scvi":
            return ScviGeneEncoder(seed=seed)
        if encoder == "pca":
            return PCAGeneEncoder(seed=seed)
        msg = f"Unknown encoder {encoder!r}; use 'scvi', 'pca', a GeneEncoder or a callable adata -> array."
        raise ValueError(msg)
    if isinstance(encoder, GeneEncoder):
        return encoder
    if callable(encoder):
        return CallableEncoder(encoder)
    msg = f"encoder must be 'scvi', 'pca', a GeneEncoder or a callable, got {type(encoder).__name__}."
    raise TypeError(msg)


class SingleCellPrior:
    """A single-cell reference as a prior for spots: shared embedding, cell-state clusters, types.

    ``fit`` trains the gene encoder on the reference over the genes shared with the spots,
    reduces the reference embeddings to ``n_pcs`` PCs and clusters them into ``n_clusters``
    cell states (MiniBatchKMeans). :meth:`label` gives each spot its nearest cell-state
    centroid and the type of its most similar reference cell (cosine, k-d tree).

    Parameters
    ----------
    reference
        Single-cell AnnData with raw counts in ``X`` (or ``layer``).
    cell_type_key
        Column of ``reference.obs`` with cell types (``'celltype_major'`` for
        :func:`stimg.datasets.her2st_sc_reference`).
    encoder
        ``'scvi'`` (default), ``'pca'``, a :class:`GeneEncoder` or a pre-trained callable.
    n_clusters
        Cell-state clusters ``C``.
    n_pcs
        PCs of the reference embedding before clustering (paper: 50; capped by the width).
    layer
        Reference layer with counts; ``None`` uses ``X``.
    seed
        Random seed.

    Examples
    --------
    >>> import stimg as si
    >>> spots, ref = si.datasets.synthetic(200, 30, image=False, reference=True, as_anndata=True)
    >>> prior = si.models.SingleCellPrior(ref, "cell_type", encoder="pca").fit(spots.var_names)
    >>> clusters, types = prior.label(prior.embed(spots))
    >>> clusters.shape, prior.type_names[types[0]] in ref.obs["cell_type"].cat.categories
    ((200,), True)
    """

    def __init__(self, reference: AnnData, cell_type_key: str = "celltype_major", *,
                 encoder: str | GeneEncoder | Callable = "scvi", n_clusters: int = 30, n_pcs: int = 50,
                 layer: str | None = None, seed: int = 0) -> None:
        if not isinstance(reference, AnnData):
            msg = f"reference must be an AnnData, got {type(reference).__name__}."
            raise TypeError(msg)
        assert_key_in(reference.obs, cell_type_key, where="reference.obs", hint="Pass cell_type_key=.")
        if layer is not None:
            assert_key_in(reference.layers, layer, where="reference.layers")
        self.reference, self.cell_type_key, self.layer = reference, cell_type_key, layer
        self.encoder = _make_encoder(encoder, seed)
        self.n_clusters, self.n_pcs, self.seed = int(n_clusters), int(n_pcs), int(seed)

    def fit(self, genes) -> SingleCellPrior:
        """Fit on the reference genes shared with ``genes`` (the spots' ``var_names``)."""
        from scipy.spatial import cKDTree
        from sklearn.cluster import MiniBatchKMeans
        from sklearn.decomposition import PCA

        shared = pd.Index(self.reference.var_names).intersection(pd.Index(genes), sort=False)
        if len(shared) < 10:
            msg = (f"Only {len(shared)} genes are shared by the spots and the reference; check gene "
                   "identifiers (symbols vs Ensembl ids).")
            raise ValueError(msg)
        self.genes_ = shared
        ref = self.reference[:, shared]
        x = ref.layers[self.layer] if self.layer is not None else ref.X
        ref = AnnData(X=sp.csr_matrix(x, dtype=np.float32), obs=pd.DataFrame(index=self.reference.obs_names),
                      var=pd.DataFrame(index=shared))
        logger.info("single-cell prior: %d cells, %d shared genes, encoder %s",
                    ref.n_obs, len(shared), type(self.encoder).__name__)
        self.encoder.fit(ref)
        emb = check_matrix(self.encoder.transform(ref), "reference embedding", n_obs=ref.n_obs).astype(np.float32)
        self.ref_embedding_ = emb
        n_pcs = min(self.n_pcs, emb.shape[1], emb.shape[0] - 1)
        self.pca_ = PCA(n_pcs, random_state=self.seed).fit(emb)
        c = min(self.n_clusters, emb.shape[0])
        self.kmeans_ = MiniBatchKMeans(c, random_state=self.seed, n_init=3, batch_size=1024).fit(self.pca_.transform(emb))
        self.centroid_tree_ = cKDTree(self.kmeans_.cluster_centers_)
        self.ref_unit_ = _unit(emb).astype(np.float32)
        types = pd.Categorical(self.reference.obs[self.cell_type_key].astype(str))
        self.type_names = list(types.categories)
        self.cell_type_codes_ = types.codes.astype(np.int64)
        return self

    @property
    def n_types(self) -> int:
        return len(self.type_names)

    @property
    def n_centroids(self) -> int:
        return int(self.kmeans_.cluster_centers_.shape[0])

    def embed(self, adata: AnnData, layer: str | None = None) -> np.ndarray:
        """Embed spots (raw counts) as queries of the reference encoder."""
        self._check_fitted()
        missing = self.genes_.difference(adata.var_names)
        x = adata.layers[layer] if layer is not None else adata.X
        q = AnnData(X=sp.csr_matrix(x, dtype=np.float32), var=pd.DataFrame(index=adata.var_names))
        if len(missing):
            q = _reindex_genes(q, self.genes_)
        else:
            q = q[:, self.genes_].copy()
        return check_matrix(self.encoder.transform(q), "spot embedding", n_obs=adata.n_obs).astype(np.float32)

    def label(self, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest cell-state centroid (PCA space) and nearest reference cell's type (cosine)."""
        self._check_fitted()
        emb = np.asarray(embedding, dtype=np.float32)
        _, cl = self.centroid_tree_.query(self.pca_.transform(emb), k=1)
        return cl.astype(np.int64), self.cell_type_codes_[self._nearest_cell(emb)]

    def _nearest_cell(self, emb: np.ndarray, chunk: int = 1 << 24) -> np.ndarray:
        """Most cosine-similar reference cell per row: chunked matrix products (k-d trees are slow in > 10-D)."""
        q = _unit(emb)
        ref = self.ref_unit_
        out = np.empty(len(q), dtype=np.int64)
        step = max(1, chunk // max(len(ref), 1))
        for i in range(0, len(q), step):
            out[i:i + step] = np.argmax(q[i:i + step] @ ref.T, axis=1)
        return out

    def cell_types(self, adata: AnnData, layer: str | None = None) -> pd.Categorical:
        """Cell type of each spot: the type of its most similar reference cell."""
        _, t = self.label(self.embed(adata, layer))
        return pd.Categorical.from_codes(t, categories=self.type_names)

    def _check_fitted(self) -> None:
        if not hasattr(self, "kmeans_"):
            msg = "SingleCellPrior is not fitted; call .fit(spot_var_names) first."
            raise RuntimeError(msg)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _reindex_genes(q: AnnData, genes: pd.Index) -> AnnData:
    cols = q.var_names.get_indexer(genes)
    x = q.X.tocsc() if sp.issparse(q.X) else sp.csc_matrix(q.X)
    out = sp.lil_matrix((q.n_obs, len(genes)), dtype=np.float32).tocsc()
    have = cols >= 0
    out[:, np.flatnonzero(have)] = x[:, cols[have]]
    return AnnData(X=out.tocsr(), var=pd.DataFrame(index=genes))
