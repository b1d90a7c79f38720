"""Preprocessing: tissue QC, stain normalisation, gene selection, patches, embeddings."""

from ._embed import embed
from ._genes import select_genes
from ._patches import extract_patches
from ._stain import StainTransform, stain_normalize, stain_vectors
from ._tile import tile_image
from ._tissue import tissue_coverage, tissue_mask

__all__ = [
    "StainTransform",
    "embed",
    "extract_patches",
    "select_genes",
    "stain_normalize",
    "stain_vectors",
    "tile_image",
    "tissue_coverage",
    "tissue_mask",
]
