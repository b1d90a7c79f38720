"""The one ``stimg`` logger; its messages go through ``tqdm.write`` so they never break a progress bar."""

from __future__ import annotations

import logging
import sys
import time


class TqdmHandler(logging.StreamHandler):
    """Write records with :func:`tqdm.tqdm.write`: open progress bars are cleared, the line is printed, bars redrawn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream or sys.stderr)
            self.flush()
        except Exception:  # logging must never raise
            self.handleError(record)


logger = logging.getLogger("stimg")
if not logger.handlers:
    _h = TqdmHandler()
    _h.setFormatter(logging.Formatter("%(levelname)s [stimg] %(message)s"))
    logger.addHandler(_h)
    logger.propagate = False


def log_added(where: str, key: str, start: float | None = None) -> None:
    """Log that ``.{where}[key]`` was written (once per field)."""
    took = f" ({time.perf_counter() - start:.1f}s)" if start is not None else ""
    logger.info("added .%s[%r]%s", where, key, took)
