"""Preprocessing: tissue QC, stain normalisation, gene selection, patches, embeddings."""

from ._embed import embed
from ._embed_grid import embed_grid
from ._genes import select_genes
from ._patches import extract_patches
from ._pseudo_spots import pseudo_spots
from ._stain import StainTransform, stain_normalize, stain_vectors
from ._tile import tile_image
from ._tissue import tissue_coverage, tissue_mask

__all__ = [
    "PatchDataset",
    "StainTransform",
    "embed",
    "embed_grid",
    "extract_patches",
    "pseudo_spots",
    "select_genes",
    "stain_normalize",
    "stain_vectors",
    "tile_image",
    "tissue_coverage",
    "tissue_mask",
]


def __getattr__(name: str):
    if name == "PatchDataset":  # needs torch: imported on first use only
        from ._patch_dataset import PatchDataset

        return PatchDataset
    msg = f"module 'stimg.pp' has no attribute {name!r}"
    raise AttributeError(msg)
