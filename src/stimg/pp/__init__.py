"""Preprocessing: tissue QC, stain normalisation, gene selection, patches, embeddings, pseudo-spots, tiles."""

from ._context import (
    ContextMethod,
    combine_features,
    list_context_methods,
    register_context_method,
    spatial_context,
)
from ._embed import embed
from ._embed_grid import embed_grid
from ._genes import select_genes
from ._integrate import integrate_expression
from ._patches import extract_patches
from ._pseudo_spots import pseudo_spots
from ._stain import StainTransform, stain_normalize, stain_vectors
from ._tile import tile_image
from ._tissue import tissue_coverage, tissue_mask

__all__ = [
    "ContextMethod",
    "PatchDataset",
    "StainTransform",
    "combine_features",
    "embed",
    "embed_grid",
    "extract_patches",
    "integrate_expression",
    "list_context_methods",
    "pseudo_spots",
    "register_context_method",
    "select_genes",
    "spatial_context",
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
