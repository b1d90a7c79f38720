"""Synthetic spatial data for fast unit tests and scaling benchmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import SPATIAL_KEY, ST_SPOT_DIAMETER_UM
from .._utils import warn
from ..io._convert import SectionData, to_anndata, to_spatialdata

_NOISE_ROWS = 256  # rows of pixel noise drawn at a time (the image is the only full-size array)
_WARN_BYTES = 2e9


def _image(xy: np.ndarray, tint: np.ndarray, side: int, pitch_px: float, rng: np.random.Generator) -> np.ndarray:
    """H&E-like ``(y, x, 3)`` uint8 image: a tinted square per spot plus pixel noise, built in place."""
    h = w = int((side + 1) * pitch_px)
    if (nbytes := h * w * 3) > _WARN_BYTES:
        warn(f"synthetic image of {h}×{w} px ({nbytes / 1e9:.1f} GB; it grows with n_spots × (pitch_um / mpp)²); "
             "pass image=False, a larger mpp or fewer spots for a smaller one.")
    img = np.full((h, w, 3), 240, np.uint8)
    r = int(round(pitch_px / 2))
    for (x, y), c in zip(xy.astype(int), tint, strict=True):
        img[max(0, y - r):y + r, max(0, x - r):x + r] = c
    for y0 in range(0, h, _NOISE_ROWS):
        block = img[y0:y0 + _NOISE_ROWS]
        noise = rng.integers(-12, 13, size=block.shape, dtype=np.int16)
        block[:] = np.clip(block.astype(np.int16) + noise, 0, 255)
    return img


def _nb_counts(rng: np.random.Generator, lib: np.ndarray, frac: np.ndarray, profiles: np.ndarray, theta: float,
               *, block: int = 200_000):
    """Sparse NB counts of spots with library sizes ``lib`` and type mixtures ``frac``, ``block`` spots at a time.

    In blocks, a million spots never hold their dense means and counts (float64) at once.
    """
    import scipy.sparse as sp

    out = []
    for a in range(0, len(lib), block):
        mu = lib[a:a + block, None] * (frac[a:a + block] @ profiles)
        out.append(sp.csr_matrix(rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float32)))
    return out[0] if len(out) == 1 else sp.vstack(out, format="csr")


def synthetic(
    n_spots: int = 400,
    n_genes: int = 50,
    *,
    n_sections: int = 1,
    n_cell_types: int = 5,
    embedding_dim: int = 32,
    image: bool = True,
    mpp: float = 1.0,
    pitch_um: float = 200.0,
    spot_diameter_um: float = ST_SPOT_DIAMETER_UM,
    reference: bool = False,
    n_cells: int = 2000,
    as_anndata: bool = False,
    seed: int = 0,
):
    """Synthetic sections whose image, embedding and counts share latent cell-type mixtures.

    Each spot holds a Dirichlet mixture of ``n_cell_types`` types that varies smoothly in
    space. Counts are negative binomial around a type-specific profile, the embedding
    ``obsm['X_synthetic']`` is a noisy linear map of the mixture, and each spot's image
    patch is tinted by its mixture, so image → expression is learnable.

    Parameters
    ----------
    n_spots
        Spots per section (on a square grid with ``pitch_um`` spacing).
    n_genes
        Genes.
    n_sections
        Sections (library ids ``S0, S1, …``).
    n_cell_types
        Latent cell types.
    embedding_dim
        Width of ``obsm['X_synthetic']``.
    image
        Draw an H&E-like image of ``((⌈√n_spots⌉ + 1) · pitch_um / mpp)²`` pixels per section
        (3 bytes each; warns above 2 GB). Peak memory is about twice the image (a transient copy
        while it is chunked for SpatialData or downsampled for AnnData), one image after; skip it
        for very large ``n_spots``.
    mpp
        µm per pixel of the image.
    pitch_um
        Grid spacing.
    spot_diameter_um
        Spot diameter.
    reference
        Also return a single-cell reference AnnData (``obs['cell_type']``, raw counts)
        over the same genes.
    n_cells
        Cells in the reference.
    as_anndata
        Return AnnData (scanpy layout) instead of SpatialData.
    seed
        Random seed.

    Returns
    -------
    SpatialData or AnnData; with ``reference=True`` a tuple ``(data, reference)``. The
    table has raw counts in ``X``, ``obs['cell_type']`` (dominant type),
    ``obsm['cell_type_fractions']`` and ``obsm['X_synthetic']``.

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(100, 20, image=False, as_anndata=True)
    >>> adata.shape
    (100, 20)
    """
    import scipy.sparse as sp

    if n_spots < 1 or n_genes < 1 or n_sections < 1 or n_cell_types < 1:
        msg = "n_spots, n_genes, n_sections and n_cell_types must all be ≥ 1."
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    types = [f"type_{k}" for k in range(n_cell_types)]
    genes = [f"gene_{g}" for g in range(n_genes)]
    # type-specific expression profiles (a few marker genes per type)
    profiles = rng.gamma(0.6, 1.0, size=(n_cell_types, n_genes)) + 0.05
    markers = rng.integers(0, n_cell_types, size=n_genes)
    profiles[markers, np.arange(n_genes)] *= 8.0
    profiles /= profiles.sum(1, keepdims=True)
    emb_map = rng.normal(size=(n_cell_types, embedding_dim))
    colors = rng.uniform(0.25, 0.95, size=(n_cell_types, 3))
    theta = 5.0
    side = int(np.ceil(np.sqrt(n_spots)))
    pitch_px = pitch_um / mpp
    sections = []
    for s in range(n_sections):
        gx, gy = np.meshgrid(np.arange(side), np.arange(side))
        gx, gy = gx.ravel()[:n_spots], gy.ravel()[:n_spots]
        # smooth spatial fields → mixtures
        centers = rng.uniform(0, side, size=(n_cell_types, 2))
        d2 = (gx[:, None] - centers[None, :, 0]) ** 2 + (gy[:, None] - centers[None, :, 1]) ** 2
        logits = -d2 / (2 * (side / 3.0) ** 2) * 4 + rng.normal(scale=0.3, size=d2.shape)
        frac = np.exp(logits - logits.max(1, keepdims=True))
        frac /= frac.sum(1, keepdims=True)
        lib = rng.lognormal(np.log(2000), 0.3, size=n_spots)
        counts = _nb_counts(rng, lib, frac, profiles, theta)
        emb = (frac @ emb_map + rng.normal(scale=0.1, size=(n_spots, embedding_dim))).astype(np.float32)
        xy = np.c_[(gx + 1) * pitch_px, (gy + 1) * pitch_px].astype(np.float64)
        lid = f"S{s}"
        obs = pd.DataFrame(
            {"array_x": gx, "array_y": gy, "cell_type": pd.Categorical(np.array(types)[frac.argmax(1)], categories=types)},
            index=[f"{lid}_{i}" for i in range(n_spots)],
        )
        ad_ = AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes))
        ad_.obsm[SPATIAL_KEY] = xy
        ad_.obsm["X_synthetic"] = emb
        ad_.obsm["cell_type_fractions"] = frac.astype(np.float32)
        img = _image(xy, (frac @ colors * 255).astype(np.uint8), side, pitch_px, rng) if image else None
        sections.append(SectionData(lid, ad_, img, mpp, spot_diameter_um, {"technology": "synthetic"}))
    data = to_anndata(sections) if as_anndata else to_spatialdata(sections)
    if not reference:
        return data
    ct = rng.integers(0, n_cell_types, size=n_cells)
    lib_c = rng.lognormal(np.log(1500), 0.4, size=n_cells)
    mu_c = lib_c[:, None] * profiles[ct]
    cc = rng.negative_binomial(theta, theta / (theta + mu_c)).astype(np.float32)
    ref = AnnData(
        X=sp.csr_matrix(cc),
        obs=pd.DataFrame({"cell_type": pd.Categorical(np.array(types)[ct], categories=types)},
                         index=[f"cell_{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=genes),
    )
    return data, ref
