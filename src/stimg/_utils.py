"""Warnings that point at the user's line, progress bars, devices."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._settings import settings

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
_PKG = str(Path(__file__).parent)


class StimgWarning(UserWarning):
    """Warnings raised by stimg."""


def warn(msg: str, category: type[Warning] = StimgWarning) -> None:
    """Warn, attributing the warning to the first frame outside stimg."""
    if sys.version_info >= (3, 12):
        warnings.warn(msg, category, skip_file_prefixes=(_PKG,))  # noqa: TID251
    else:  # pragma: no cover - 3.11
        f, level = sys._getframe(1), 2
        while f is not None and f.f_code.co_filename.startswith(_PKG):
            f, level = f.f_back, level + 1
        warnings.warn(msg, category, stacklevel=level)  # noqa: TID251


def progress_bar(it: Iterable[T], *, desc: str, total: int | None = None, progress: bool | None = None,
                 **kwargs: Any) -> Iterable[T]:
    """Wrap ``it`` in a tqdm bar when progress is on (``None`` → ``si.settings.progress``)."""
    show = settings.progress if progress is None else progress
    if not show:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, **kwargs)


@contextmanager
def torch_threads(n_obs: int, *, small: int = 50_000) -> Iterator[None]:
    """Run small models single-threaded: torch intra-op threads and BLAS (numpy/scipy) pools.

    Thread start-up and spin-waiting dominate on small problems, and cores are often shared: an NB
    head on 700 spots used 12× more CPU time with 2 threads than with 1 on a busy 2-core machine.
    """
    import torch
    from threadpoolctl import threadpool_limits

    if n_obs >= small:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(old)


def resolve_device(accelerator: str | None = None) -> torch.device:
    """Turn ``"auto"``/``"cpu"``/``"gpu"``/``"cuda"``/``"mps"`` into a :class:`torch.device`."""
    import torch

    acc = settings.accelerator if accelerator is None else accelerator
    if acc == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device({"gpu": "cuda"}.get(acc, acc))
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"accelerator={acc!r} was requested but CUDA is not available; use accelerator='cpu' or 'auto'."
        raise RuntimeError(msg)
    return dev


def rng(seed: int | None = None):
    """A numpy Generator from ``seed`` (``None`` → ``si.settings.seed``)."""
    import numpy as np

    return np.random.default_rng(settings.seed if seed is None else seed)
