"""HER2-positive breast cancer legacy-ST data set (Andersson et al., Nat. Commun. 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .._logging import logger
from .._settings import settings
from .._utils import warn
from ..io._convert import SectionData, to_anndata, to_spatialdata
from ..io._legacy_st import legacy_st_section
from ._fetch import fetch
from ._her2st_hashes import HASHES

_REPO = "https://github.com/almaan/her2st/raw"
_C_CNTS = "e75e5c53a994726a8ad251aaf653a02d7932eb6a"
_C_DATA = "9f2260c6aa8347996955d53f0a5f06ac14c93470"
_C_APP = "47b2e34be3bacfb7564095859c6a6003c26765d9"

#: The 36 sections of the public data set (patients A–H).
SECTIONS: tuple[str, ...] = tuple(
    [f"{p}{i}" for p in "ABCD" for i in range(1, 7)] + [f"{p}{i}" for p in "EFGH" for i in range(1, 4)]
)

# section -> (local file name under her2st/images, remote path, image_scale, µm/px or None, low-res note)
_IMAGES: dict[str, tuple[str, str, float]] = {
    "A1": ("A1_HE_image_dark.png", f"{_C_APP}/backup/app/www/imgs/A1_HE_image_dark.png", 2000 / 6954),
    "B4": ("B4_BT10737_D2_HE.jpg", f"{_C_DATA}/data/ST-imgs/B/B4/BT10737_D2_HE.jpg", 1.0),
    "C2": ("C2_5714_HE_BT_C2.jpg", f"{_C_DATA}/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg", 1.0),
    "C3": ("C3_5714_HE_BT_D1.jpg", f"{_C_DATA}/data/ST-imgs/C/C3/5714_HE_BT_D1.jpg", 1.0),
    "C4": ("C4_5714_HE_BT_D2.jpg", f"{_C_DATA}/data/ST-imgs/C/C4/5714_HE_BT_D2.jpg", 1.0),
    "C5": ("C5_5714_HE_BT_E1.jpg", f"{_C_DATA}/data/ST-imgs/C/C5/5714_HE_BT_E1.jpg", 1.0),
    "C6": ("C6_5714_HE_BT_E2.jpg", f"{_C_DATA}/data/ST-imgs/C/C6/5714_HE_BT_E2.jpg", 1.0),
}
#: Sections whose H&E image is public.
SECTIONS_WITH_IMAGE: tuple[str, ...] = tuple(_IMAGES)
# µm/px of the public images (HEST-1k metadata); the generic reader would estimate them from the pitch.
_MPP: dict[str, float] = {"A1": 3.20, "C2": 0.696, "C3": 0.669, "C4": 0.690, "C5": 0.691, "C6": 0.698}
# A1's low-resolution PNG carries a thumbnail of another image in its top-right corner.
_A1_THUMBNAIL = (slice(0, 561), slice(1480, None))


def _file(rel: str, remote: str | None) -> str:
    return str(fetch(f"her2st/{rel}", None if remote is None else f"{_REPO}/{remote}", HASHES.get(rel)))


def _check_sections(section: str | Sequence[str] | None) -> list[str]:
    if section is None:
        return list(SECTIONS)
    if isinstance(section, str):
        secs = [section]
    elif isinstance(section, Sequence) and all(isinstance(s, str) for s in section):
        secs = list(section)
    else:
        msg = (f"section must be a section name such as 'C2' or a list of names, got {section!r} "
               f"({type(section).__name__}). Known sections: {', '.join(SECTIONS)}.")
        raise TypeError(msg)
    if not secs:
        msg = "No section given; pass e.g. section='C2' or a list of sections."
        raise ValueError(msg)
    if unknown := [s for s in secs if s not in SECTIONS]:
        msg = f"Unknown HER2ST section(s) {unknown}. Known sections: {', '.join(SECTIONS)}."
        raise ValueError(msg)
    if len(set(secs)) != len(secs):
        msg = f"Duplicate sections in {secs}."
        raise ValueError(msg)
    return secs


def available_sections(*, with_image: bool = False) -> list[str]:
    """Sections whose files are present in :attr:`stimg.settings.datadir` (no download).

    Parameters
    ----------
    with_image
        Only sections whose H&E image is present too.

    Returns
    -------
    Section names, in the order of :data:`~stimg.datasets.HER2ST_SECTIONS`.

    Examples
    --------
    >>> import stimg as si
    >>> si.datasets.available_sections(with_image=True)  # doctest: +SKIP
    ['A1', 'C2', 'C3', 'C4', 'C5', 'C6']
    """
    root = settings.datadir / "her2st"
    out = []
    for s in SECTIONS:
        if not ((root / "counts" / f"{s}.tsv.gz").exists() and (root / "spots" / f"{s}_selection.tsv").exists()):
            continue
        if with_image and not (s in _IMAGES and (root / "images" / _IMAGES[s][0]).exists()):
            continue
        out.append(s)
    return out


def _cluster_names(path, patient: str) -> dict[int, str]:
    """``{cluster: 'k: name'}`` from the study's cluster_motivation.csv (names hold unquoted commas)."""
    names = {}
    for line in path.read_text().splitlines()[1:]:
        parts = line.split(",", 2)
        if len(parts) < 3 or parts[0].strip() != patient or not parts[1].strip().isdigit():
            continue
        rest = parts[2]
        name = rest.split(",Marker")[0] if ",Marker" in rest else rest.split(",")[0]
        names[int(parts[1])] = f"{int(parts[1])}: {' '.join(name.split())}"
    return names


def _extras(sec: SectionData) -> None:
    """Attach pathologist labels, expression clusters and deconvolution when present locally."""
    root = settings.datadir / "her2st"
    s, obs = sec.library_id, sec.adata.obs
    grid_id = obs["array_x"].astype(str) + "x" + obs["array_y"].astype(str)
    lab = root / "labels_pathologist" / f"{s}_labeled_coordinates.tsv"
    if lab.exists():
        df = pd.read_csv(lab, sep="\t").dropna(subset=["x", "y"])
        df.index = df["x"].round().astype(int).astype(str) + "x" + df["y"].round().astype(int).astype(str)
        df = df[~df.index.duplicated()]
        obs["pathologist_label"] = pd.Categorical(grid_id.map(df["label"]).to_numpy())
    clu = root / "labels_cluster" / f"{s}-cluster-annotation.tsv.gz"
    if clu.exists():
        df = pd.read_csv(clu, sep="\t", index_col=0)
        df.index = df["x"].astype(int).astype(str) + "x" + df["y"].astype(int).astype(str)
        df = df[~df.index.duplicated()]
        ids = grid_id.map(df["label"])
        names = {}
        mot = root / "meta" / "cluster_motivation.csv"
        if mot.exists():
            names = _cluster_names(mot, s[0])
        lab = ids.map(lambda v: None if pd.isna(v) else names.get(int(v), str(int(v))))
        cats = [names.get(int(v), str(int(v))) for v in sorted(ids.dropna().unique())]
        obs["expression_cluster"] = pd.Categorical(lab.to_numpy(), categories=cats)
    for level in ("major", "minor"):
        dec = root / "deconv" / level / f"{s}-proportion.tsv"
        if dec.exists():
            df = pd.read_csv(dec, sep="\t", index_col=0)
            df.index = df.index.astype(str)
            df.columns = [str(c).strip() for c in df.columns]
            prop = df.reindex(grid_id.to_numpy())
            if prop.notna().all(axis=1).mean() > 0.5:
                sec.adata.obsm[f"deconv_{level}"] = prop.fillna(0.0).set_index(obs.index)


def her2st_section(section: str, *, image: bool = True, extras: bool = True) -> SectionData:
    """One HER2ST section as :class:`~stimg.io._convert.SectionData` (internal)."""
    rel_c, rel_s = f"counts/{section}.tsv.gz", f"spots/{section}_selection.tsv"
    counts = _file(rel_c, f"{_C_CNTS}/data/ST-cnts/{section}.tsv.gz")
    spots = _file(rel_s, f"{_C_DATA}/data/ST-spotfiles/{section}_selection.tsv")
    img, scale = None, 1.0
    if image and section in _IMAGES:
        name, remote, scale = _IMAGES[section]
        from ..io._image import read_image

        img = read_image(_file(f"images/{name}", remote))
        if section == "A1":  # mask the thumbnail of another image (background is black)
            img = img.copy()
            img[_A1_THUMBNAIL] = 0
    meta = {"dataset": "her2st", "patient": section[0], "technology": "legacy_st"}
    mpp = _MPP.get(section) if img is not None else None
    sec = legacy_st_section(counts, spots, img, mpp, library_id=section, image_scale=scale, metadata=meta)
    sec.adata.obs["patient"] = section[0]
    if extras:
        _extras(sec)
    return sec


def her2st(
    section: str | Sequence[str] = "C2",
    *,
    image: bool = True,
    as_anndata: bool = False,
    extras: bool = True,
):
    """HER2-positive breast cancer legacy-ST sections (Andersson et al. 2021).

    Files are read from :attr:`stimg.settings.datadir` (``STIMG_DATA_DIR``) under ``her2st/``
    (``counts/{S}.tsv.gz``, ``spots/{S}_selection.tsv``, ``images/…``) and otherwise
    downloaded from the public repository with a SHA-256 check.

    Parameters
    ----------
    section
        One or several of the 36 sections ``A1 … H3`` (:data:`~stimg.datasets.HER2ST_SECTIONS`). Sections without a
        public image (all but :data:`~stimg.datasets.HER2ST_SECTIONS_WITH_IMAGE`) are read as counts only.
    image
        Read the H&E image where one exists. C2–C6 are full resolution (~0.69 µm/px);
        A1 is a 2000-px-wide copy (3.2 µm/px) whose top-right thumbnail is masked out.
    as_anndata
        Return :class:`~anndata.AnnData` with scanpy's ``.uns['spatial']`` instead of SpatialData.
    extras
        Attach, where present locally, ``obs['pathologist_label']``, ``obs['expression_cluster']`` (named
        by the study's cluster annotation)
        ``obsm['deconv_major']`` and ``obsm['deconv_minor']`` (stereoscope proportions of 8 major and 22
        minor cell types).

    Returns
    -------
    :class:`~spatialdata.SpatialData` with images ``{S}_full_image``, circles ``{S}`` (100 µm
    spots, radius in pixels) and table ``'table'`` (raw counts, ``obs['library_id']``,
    ``obs['patient']``, grid coordinates ``obs['array_x'/'array_y']``), or the AnnData form.
    µm/px (published values for C2–C6 and A1, else estimated from the 200 µm spot pitch) is stored in
    ``table.uns['spatial'][S]['scalefactors']['microns_per_pixel']``.

    Examples
    --------
    >>> import stimg as si
    >>> sdata = si.datasets.her2st("C2")  # doctest: +SKIP
    >>> adata = si.datasets.her2st(["C2", "C3"], as_anndata=True)  # doctest: +SKIP
    """
    secs = _check_sections(section)
    if image and (no_image := [s for s in secs if s not in _IMAGES]):
        warn(f"HER2ST section(s) {no_image} have no public H&E image and are read as counts only (sections with "
             f"images: {', '.join(SECTIONS_WITH_IMAGE)}); pass image=False to read counts only without this warning.")
    data = []
    for s in secs:
        data.append(her2st_section(s, image=image, extras=extras))
        logger.info("read HER2ST %s: %d spots, %s", s, data[-1].adata.n_obs,
                    "no image" if data[-1].image is None else f"image {data[-1].image.shape[1]}×{data[-1].image.shape[0]} px, {data[-1].mpp:.3f} µm/px")
    return to_anndata(data) if as_anndata else to_spatialdata(data)


def her2st_sc_reference():
    """Breast cancer single-cell reference (Wu et al., Nat. Genet. 2021; sample CID4465).

    1,564 cells × 29,733 genes, raw counts in ``X``, with ``obs['celltype_major']`` (9 types),
    ``obs['celltype_minor']`` and ``obs['celltype_subset']``. Read from
    ``{datadir}/sc_reference/wu2021_CID4465_sc.h5ad``; this converted file has no public
    download, so a missing file raises :class:`FileNotFoundError`.

    Examples
    --------
    >>> import stimg as si
    >>> ref = si.datasets.her2st_sc_reference()  # doctest: +SKIP
    """
    import anndata as ad

    path = fetch("sc_reference/wu2021_CID4465_sc.h5ad", None, None)
    ref = ad.read_h5ad(path)
    if not np.issubdtype(ref.X.dtype, np.number):
        msg = f"{path} has non-numeric X."
        raise TypeError(msg)
    return ref
