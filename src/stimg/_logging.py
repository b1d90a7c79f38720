"""The one ``stimg`` logger."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("stimg")
if not logger.handlers:
    _h = logging.StreamHandler()
    _h.setFormatter(logging.Formatter("%(levelname)s [stimg] %(message)s"))
    logger.addHandler(_h)
    logger.propagate = False


def log_added(where: str, key: str, start: float | None = None) -> None:
    """Log that ``.{where}[key]`` was written (once per field)."""
    took = f" ({time.perf_counter() - start:.1f}s)" if start is not None else ""
    logger.info("added .%s[%r]%s", where, key, took)
