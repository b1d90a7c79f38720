"""Registry keys and storage keys of :class:`~stimg.models.ContrastiveAligner`."""

from typing import NamedTuple


class _AlignKeys(NamedTuple):
    IMAGE: str = "image"
    GENE: str = "gene"


ALIGN_KEYS = _AlignKeys()
PROFILE_OBSM = "_si_align_log1p"  # dense log1p counts of the model's genes (written by setup_anndata)
ROW_OBSM = "_si_align_row"  # row positions: the image input of a model that reads patches (LoRA encoder)
IMAGE_OBSM = "si_align_image"  # joint-space image embeddings (si.tl.align)
GENE_OBSM = "si_align_gene"  # joint-space expression embeddings (si.tl.align)
