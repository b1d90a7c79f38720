"""Resolve data files: ``si.settings.datadir`` first, else a checksummed pooch download."""

from __future__ import annotations

from pathlib import Path

from .._logging import logger
from .._settings import settings


def fetch(relpath: str, url: str | None, known_hash: str | None) -> Path:
    """Return the local path of ``relpath`` under the data directory, downloading it if missing.

    Parameters
    ----------
    relpath
        Path relative to :attr:`stimg.settings.datadir`, e.g. ``"her2st/counts/C2.tsv.gz"``.
    url
        Public source. ``None`` means the file cannot be downloaded.
    known_hash
        ``"sha256:…"``-less hex digest checked after download (``None`` skips the check).
    """
    local = settings.datadir / relpath
    if local.exists():
        return local
    if url is None:
        msg = (
            f"{relpath!r} is not in the data directory {str(settings.datadir)!r} and has no public download. "
            "Set STIMG_DATA_DIR (or si.settings.datadir) to a folder that contains it."
        )
        raise FileNotFoundError(msg)
    import pooch

    logger.info("downloading %s", url)
    try:
        path = pooch.retrieve(
            url, known_hash=None if known_hash is None else f"sha256:{known_hash}",
            fname=local.name, path=local.parent, progressbar=settings.progress,
        )
    except Exception as e:  # network errors, checksum mismatch, HTTP errors
        msg = (
            f"{relpath!r} is not in the data directory {str(settings.datadir)!r} and downloading it from "
            f"{url} failed ({type(e).__name__}: {e}). Set STIMG_DATA_DIR (or si.settings.datadir) to a folder "
            "that holds the files, or check the network."
        )
        raise FileNotFoundError(msg) from e
    return Path(path)
