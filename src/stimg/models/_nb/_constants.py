"""Registry keys of :class:`~stimg.models.NBRegressor`."""

from typing import NamedTuple


class _NBKeys(NamedTuple):
    EMB: str = "embedding"
    COUNTS: str = "target_counts"
    LOG_LIB: str = "log_library"


NB_KEYS = _NBKeys()
COUNTS_OBSM = "_si_nb_counts"  # dense raw counts of the target genes (written by setup_anndata)
LOG_LIB_OBS = "_si_nb_log_library"  # log library size (written by setup_anndata when asked)
