"""Torch dataset of fixed physical-size patches around spots (imported lazily: needs torch)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._logging import logger
from .._spatial import Section

_MAX_CROP_BYTES = 2**30  # one patch's crop at image resolution: refuse larger windows (a unit mix-up)


class _InMemoryChunks:
    """Window reads straight from the chunks of an in-memory dask array (no copy, no scheduler).

    Built only when the array's graph is a single layer holding one materialised ``ndarray`` per
    block (what :func:`dask.array.from_array` makes of an in-memory image); otherwise
    :meth:`from_dask` returns ``None`` and the caller falls back to a one-off read.
    """

    def __init__(self, blocks: dict, bounds: list[np.ndarray], shape: tuple, dtype) -> None:
        self.blocks, self.bounds, self.shape, self.dtype = blocks, bounds, shape, dtype

    @classmethod
    def from_dask(cls, arr) -> _InMemoryChunks | None:
        try:
            graph = arr.__dask_graph__()
            if len(getattr(graph, "layers", {0: 0})) != 1 or arr.numblocks[0] != 1:
                return None
            blocks = {}
            for idx in np.ndindex(*arr.numblocks):
                block = graph[(arr.name, *idx)]
                want = tuple(arr.chunks[d][i] for d, i in enumerate(idx))
                if not isinstance(block, np.ndarray) or block.shape != want or block.dtype != arr.dtype:
                    return None
                blocks[idx[1:]] = block
        except (KeyError, AttributeError, TypeError):
            return None
        bounds = [np.concatenate([[0], np.cumsum(c)]) for c in arr.chunks[1:]]
        return cls(blocks, bounds, tuple(arr.shape), arr.dtype)

    @classmethod
    def read_windows(cls, arr, xy: np.ndarray, window_px: int) -> _InMemoryChunks:
        """Read, once each, only the chunks of lazy ``arr`` that square windows of ``window_px`` around ``xy`` touch.

        The windows are placed as :meth:`PatchDataset.window` places them, so every crop of these
        spots reads from the returned chunks; chunks no window touches are never read.
        """
        import dask

        if arr.numblocks[0] != 1:
            arr = arr.rechunk({0: -1})
        _, h, w = arr.shape
        by, bx = (np.concatenate([[0], np.cumsum(c)]) for c in arr.chunks[1:])
        xy = np.asarray(xy, dtype=np.float64)
        x0 = np.floor(xy[:, 0] - window_px / 2 + 0.5).astype(int)
        y0 = np.floor(xy[:, 1] - window_px / 2 + 0.5).astype(int)
        need: set[tuple[int, int]] = set()
        for xa, ya in zip(x0, y0, strict=True):
            xs, ys = (max(xa, 0), min(xa + window_px, w)), (max(ya, 0), min(ya + window_px, h))
            if xs[0] >= xs[1] or ys[0] >= ys[1]:
                continue  # entirely off the image: padding only
            rows = range(np.searchsorted(by, ys[0], "right") - 1, np.searchsorted(by, ys[1], "left"))
            cols = range(np.searchsorted(bx, xs[0], "right") - 1, np.searchsorted(bx, xs[1], "left"))
            need.update((i, j) for i in rows for j in cols)
        keys = sorted(need)
        blocks = dask.compute(*[arr.blocks[0, i, j] for i, j in keys])
        return cls(dict(zip(keys, blocks, strict=True)), [by, bx], tuple(arr.shape), arr.dtype)

    def __getitem__(self, key) -> np.ndarray:
        _, ys, xs = key
        out = np.empty((self.shape[0], ys.stop - ys.start, xs.stop - xs.start), self.dtype)
        by, bx = self.bounds
        for i in range(np.searchsorted(by, ys.start, "right") - 1, np.searchsorted(by, ys.stop, "left")):
            y0, y1 = max(ys.start, by[i]), min(ys.stop, by[i + 1])
            for j in range(np.searchsorted(bx, xs.start, "right") - 1, np.searchsorted(bx, xs.stop, "left")):
                x0, x1 = max(xs.start, bx[j]), min(xs.stop, bx[j + 1])
                out[:, y0 - ys.start:y1 - ys.start, x0 - xs.start:x1 - xs.start] = \
                    self.blocks[(i, j)][:, y0 - by[i]:y1 - by[i], x0 - bx[j]:x1 - bx[j]]
        return out


class PatchDataset(Dataset):
    """Patches of ``patch_um`` µm around each spot, resized to ``patch_px`` pixels.

    Item ``i`` is a ``(3, patch_px, patch_px)`` uint8 tensor for spot ``obs_index[i]`` of the
    table (or whatever ``transform`` returns). Windows that reach past the image border are
    padded with ``pad_value``. Images already in memory (dask arrays over in-memory chunks, as
    the readers make them) are read window by window from their chunks without a copy; other
    lazy images no larger than ``cache_bytes`` are read into memory once per section (never once
    per patch), and larger ones window by window.
    Works with :class:`torch.utils.data.DataLoader` workers.

    Attributes
    ----------
    obs_index
        Table row of each item.
    obs_names
        Spot names of each item.
    centers
        ``(n, 2)`` spot centres (x, y) in pixels of their section image.
    window_px
        Side of each item's crop in image pixels before resizing.
    """

    def __init__(
        self,
        sections: list[Section],
        obs_names: np.ndarray,
        *,
        patch_um: float,
        patch_px: int,
        pad_value: int = 255,
        stain: Callable[[np.ndarray], np.ndarray] | Mapping[str, Callable] | None = None,
        transform: Callable[[torch.Tensor], Any] | None = None,
        cache_bytes: float = 2e9,
    ) -> None:
        self.patch_um, self.patch_px, self.pad_value = float(patch_um), int(patch_px), int(pad_value)
        self.transform = transform
        self.library_ids = [s.library_id for s in sections]
        if isinstance(stain, Mapping):
            if missing := [lib for lib in self.library_ids if lib not in stain]:
                msg = f"stain has no transform for sections {missing}; fit it on all sections used."
                raise KeyError(msg)
            self._stain = [stain[lib] for lib in self.library_ids]
        else:
            self._stain = [stain] * len(self.library_ids)
        self._images: list[Any] = []
        budget = float(cache_bytes)
        for s in sections:
            arr = s.image_array()
            nbytes = int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize
            if isinstance(arr, _InMemoryChunks):  # chunks already read (e.g. by a dask task)
                chunks = arr
            else:
                chunks = None if isinstance(arr, np.ndarray) else _InMemoryChunks.from_dask(arr)
            if chunks is not None:
                arr = chunks  # already in memory: read windows from its chunks, no copy
            elif not isinstance(arr, np.ndarray) and nbytes <= budget:
                arr = np.asarray(arr)  # one read per section
                budget -= nbytes
            elif isinstance(arr, np.ndarray):
                budget -= nbytes
            else:
                logger.info("%s: image of %.1f GB is read window by window", s.library_id, nbytes / 1e9)
            self._images.append(arr)
        self.obs_index = np.concatenate([s.obs_index for s in sections])
        self.obs_names = np.asarray(obs_names)[self.obs_index]
        self._section = np.concatenate([np.full(s.n_obs, k) for k, s in enumerate(sections)])
        self.centers = np.concatenate([s.xy for s in sections]).astype(np.float64)
        self.mpp = np.concatenate([np.full(s.n_obs, s.mpp, dtype=np.float64) for s in sections])
        win = self.patch_um / self.mpp
        if len(win) and (big := float(win.max())) ** 2 * 3 > _MAX_CROP_BYTES:  # before any crop is allocated
            k = int(np.argmax(win))
            msg = (f"patch_um={self.patch_um:g} µm is a window of {big:.0f} px per side at {self.mpp[k]:g} µm/px "
                   f"({big * big * 3 / 1e9:.1f} GB per patch); patch_um is the patch side in µm (HEST uses 112).")
            raise ValueError(msg)
        self.window_px = np.maximum(1, np.rint(win)).astype(int)
    def __len__(self) -> int:
        return len(self.obs_index)

    def window(self, i: int) -> tuple[int, int, int]:
        """``(x0, y0, size)`` of item ``i``'s crop in image pixels."""
        w = int(self.window_px[i])
        cx, cy = self.centers[i]
        return int(np.floor(cx - w / 2 + 0.5)), int(np.floor(cy - w / 2 + 0.5)), w

    def crop(self, i: int) -> np.ndarray:
        """Raw ``(w, w, 3)`` uint8 crop of item ``i`` at image resolution, border-padded."""
        img = self._images[self._section[i]]
        _, h, wid = img.shape
        x0, y0, w = self.window(i)
        out = np.full((w, w, 3), self.pad_value, dtype=np.uint8)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, wid), min(y0 + w, h)
        if xa < xb and ya < yb:
            block = np.asarray(img[:, ya:yb, xa:xb])
            out[ya - y0:yb - y0, xa - x0:xb - x0] = np.moveaxis(block, 0, -1)
        return out

    def patch(self, i: int) -> np.ndarray:
        """``(patch_px, patch_px, 3)`` uint8 patch of item ``i`` (resized, stain-normalised)."""
        from PIL import Image

        crop = self.crop(i)
        if crop.shape[0] != self.patch_px:
            crop = np.asarray(Image.fromarray(crop).resize((self.patch_px, self.patch_px), Image.Resampling.BILINEAR))
        stain = self._stain[self._section[i]]
        if stain is not None:
            crop = stain(crop)
        return crop

    @staticmethod
    def collate(items: list) -> torch.Tensor:
        """Stack uint8 patches through numpy (``torch.stack`` of uint8 is slow on busy CPUs).

        Pass as ``DataLoader(dataset, collate_fn=dataset.collate)``; falls back to torch's default
        collation for items that are not tensors (e.g. with a ``transform``).
        """
        if items and all(isinstance(x, torch.Tensor) for x in items):
            return torch.from_numpy(np.stack([x.numpy() for x in items]))
        return torch.utils.data.default_collate(items)

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(self.patch(int(i)), -1, 0)))
        return self.transform(x) if self.transform is not None else x
