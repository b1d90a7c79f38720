"""Global settings: ``si.settings``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}


class _Settings:
    """Library-wide defaults, read by every function that takes ``None`` for an option.

    Attributes
    ----------
    datadir
        Where real data sets are looked up before any download. Defaults to the
        ``STIMG_DATA_DIR`` environment variable, else ``~/.cache/stimg``.
    verbosity
        0 errors, 1 warnings, 2 info (default), 3 debug.
    progress
        Show progress bars on long loops.
    accelerator
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``/``"gpu"`` or ``"mps"``.
    devices
        Default Lightning ``devices`` of every model's ``train`` (``"auto"``, a count or a list of ids).
    batch_size
        Default batch size for image encoders.
    num_workers
        Default number of DataLoader workers for patch reading.
    seed
        Default random seed.
    """

    def __init__(self) -> None:
        self._datadir: Path | None = None
        self._verbosity = 2
        self.progress: bool = True
        self.accelerator: str = "auto"
        self.devices: int | str | list[int] = "auto"
        self.batch_size: int = 64
        self.num_workers: int = 0
        self.seed: int = 0
        self._apply_verbosity()

    @property
    def datadir(self) -> Path:
        if self._datadir is not None:
            return self._datadir
        env = os.environ.get("STIMG_DATA_DIR")
        if env:
            return Path(env).expanduser()
        return Path("~/.cache/stimg").expanduser()

    @datadir.setter
    def datadir(self, value: str | os.PathLike | None) -> None:
        self._datadir = None if value is None else Path(value).expanduser()

    @property
    def verbosity(self) -> int:
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int) -> None:
        if value not in _LEVELS:
            msg = f"verbosity must be one of {sorted(_LEVELS)}, got {value!r}."
            raise ValueError(msg)
        self._verbosity = value
        self._apply_verbosity()

    def _apply_verbosity(self) -> None:
        logging.getLogger("stimg").setLevel(_LEVELS[self._verbosity])

    def __repr__(self) -> str:
        fields = ["datadir", "verbosity", "progress", "accelerator", "devices", "batch_size", "num_workers", "seed"]
        return "stimg settings\n" + "\n".join(f"  {f}: {getattr(self, f)!r}" for f in fields)


settings = _Settings()
