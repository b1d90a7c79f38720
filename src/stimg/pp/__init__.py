"""Preprocessing: tissue QC, stain normalisation, gene selection, patches, embeddings."""

from ._patches import extract_patches

__all__ = ["extract_patches"]
