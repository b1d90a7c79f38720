"""Training pieces shared by :class:`NBRegressor` and :class:`NBFinetuner` (one copy each)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


def split_train_validation(rows: np.ndarray, validation_size: float, early_stopping: bool,
                           seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw the validation rows from the training rows: ``(train, validation)``, each sorted.

    ``round(validation_size · n)`` rows, at least one with ``early_stopping``; raises when nothing
    would be left to train on.
    """
    if not 0 <= validation_size < 1:
        msg = f"validation_size must be in [0, 1), got {validation_size!r}."
        raise ValueError(msg)
    rows = np.random.default_rng(seed).permutation(np.unique(rows))
    n_val = int(round(validation_size * rows.size))
    if early_stopping:
        n_val = max(1, n_val)
    if n_val >= rows.size:
        msg = (f"validation_size={validation_size} (early_stopping={early_stopping}) leaves no training spots "
               f"out of {rows.size}; train on more spots or pass early_stopping=False, validation_size=0.")
        raise ValueError(msg)
    return np.sort(rows[n_val:]), np.sort(rows[:n_val])


def restore_best(monitor: str, attr: str = "module"):
    """Lightning callback: keep the weights of the best ``monitor`` epoch in memory, restore them at the end.

    ``attr`` names the LightningModule attribute holding the network (scvi's training plan and the
    finetuner's plan both call it ``module``).
    """
    from lightning.pytorch.callbacks import Callback

    class RestoreBest(Callback):
        def __init__(self) -> None:
            self.best, self.state = float("inf"), None

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            val = trainer.callback_metrics.get(monitor)
            if val is not None and float(val) < self.best:
                self.best = float(val)
                net = getattr(pl_module, attr)
                self.state = {k: v.detach().clone() for k, v in net.state_dict().items()}

        def on_train_end(self, trainer, pl_module) -> None:
            if self.state is not None:
                getattr(pl_module, attr).load_state_dict(self.state)

    return RestoreBest()


def register_quietly(manager, adata, **kwargs) -> None:
    """``manager.register_fields(adata)`` without scvi's "Generating sequential column names" INFO for obsm fields."""
    scvi_logger = logging.getLogger("scvi")
    old = scvi_logger.level
    scvi_logger.setLevel(logging.WARNING)
    try:
        manager.register_fields(adata, **kwargs)
    finally:
        scvi_logger.setLevel(old)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's INFO chatter ("GPU available", "Seed set" ...) and its data-loader tips."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            from lightning.fabric.utilities.warnings import PossibleUserWarning

            warnings.filterwarnings("ignore", category=PossibleUserWarning)
            warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
            warnings.filterwarnings("ignore", message=".*treespec.*")
            # scvi's note on a small last minibatch: harmless for the NB head (LayerNorm, no BatchNorm)
            warnings.filterwarnings("ignore", message=".*Last batch will have a small size.*")
            yield
    finally:
        for lg, lv in zip(loggers, old, strict=True):
            lg.setLevel(lv)
