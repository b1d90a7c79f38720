"""Preprocessing: tissue QC, stain normalisation, gene selection, patches, embeddings."""

from ._patches import extract_patches
from ._tissue import tissue_coverage, tissue_mask

__all__ = ["extract_patches", "tissue_coverage", "tissue_mask"]
