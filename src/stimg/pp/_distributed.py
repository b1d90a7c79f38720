"""Embedding many slides through a ``dask.distributed`` cluster (DESIGN §7): one task per chunk of spots.

The driver only plans: it splits the spots still to embed into chunks of whole batches (in the
order the single-process path batches them, so every patch meets the same batch-mates and the
features are bit-identical at equal threads per process), and submits one task per chunk. Each
task gets the spots' centres and a *lazy* reference to their section images; in the worker it
reads each image chunk its patch windows touch once, cuts the patches and runs the encoder. Images
on disk (zarr-backed SpatialData, WSIs opened lazily) are read only in the workers; the driver never
holds pixels, only the returned features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .._spatial import Section


def _chunks(sections: list[Section], spots_per_task: int) -> list[list[Section]]:
    """Consecutive slices of the concatenated spots of ``sections``, ``spots_per_task`` each."""
    offsets = np.concatenate([[0], np.cumsum([s.n_obs for s in sections])])
    total = int(offsets[-1])
    out = []
    for start in range(0, total, spots_per_task):
        stop = min(start + spots_per_task, total)
        pieces = []
        for k, s in enumerate(sections):
            a, b = max(start, offsets[k]) - offsets[k], min(stop, offsets[k + 1]) - offsets[k]
            if a < b:
                pieces.append(dataclasses.replace(s, obs_index=s.obs_index[a:b], xy=s.xy[a:b]))
        out.append(pieces)
    return out


@dataclasses.dataclass
class _Pixels:
    """A section image sent to the cluster once (a plain holder: dicts and dask arrays are special to scatter)."""

    image: Any


def _in_memory(arr: Any) -> bool:
    """Whether an image's pixels already live in memory (numpy, or dask over numpy blocks)."""
    if isinstance(arr, np.ndarray):
        return True
    graph = getattr(arr, "__dask_graph__", None)
    return graph is not None and any(isinstance(v, np.ndarray) for v in graph().values())


def _embed_task(pieces: list[Section], encoder: Any, build: tuple | None, images: dict, *, patch_um: float,
                patch_px: int, stain: Callable | Mapping | None, batch_size: int, accelerator: str | None,
                amp: bool | None) -> np.ndarray:
    """Run in a worker: cut the chunk's patches from the (lazy) images and encode them."""
    import dask

    from .._utils import resolve_device
    from ._embed import _amp_dtype, _get_encoder, run_encoder
    from ._patch_dataset import PatchDataset

    if encoder is None:  # a registry/timm name: build once per worker process (cached by identity)
        encoder = _get_encoder(*build)
    device = resolve_device(accelerator)
    # local row numbers: only this chunk's spot names travel
    local, n = [], 0
    for p in pieces:
        image = images[p.library_id].image if p.library_id in images else p.image
        local.append(dataclasses.replace(p, obs_index=np.arange(n, n + p.n_obs), image=image))
        n += p.n_obs
    with dask.config.set(scheduler="synchronous"):  # lazy image reads happen here, in this worker
        local = [dataclasses.replace(p, image=_prefetch(p, patch_um)) for p in local]
        ds = PatchDataset(local, np.arange(n).astype(str), patch_um=patch_um, patch_px=patch_px, stain=stain)
        return run_encoder(encoder, ds, batch_size=batch_size, num_workers=0, device=device,
                           amp_dtype=_amp_dtype(device, amp), progress=False)


def _prefetch(section: Section, patch_um: float) -> Any:
    """The image chunks this task's patch windows touch, each read once (in-memory images pass through)."""
    from ._patch_dataset import _InMemoryChunks

    arr = section.image_array()
    if _in_memory(arr) or not hasattr(arr, "blocks"):
        return section.image
    return _InMemoryChunks.read_windows(arr, section.xy, max(1, int(np.rint(patch_um / section.mpp))))


def embed_distributed(client: Any, todo: list[Section], *, encoder: Any, build: tuple | None, patch_um: float,
                      patch_px: int, stain: Callable | Mapping | None, batch_size: int, accelerator: str | None,
                      amp: bool | None, spots_per_task: int | None, progress: bool | None) -> np.ndarray:
    """Features of every spot of ``todo`` (in order), computed by tasks on ``client``'s workers.

    ``encoder`` is a built module (sent to every worker once) or ``None`` with ``build`` the
    arguments of :func:`stimg.pp._embed._get_encoder` (each worker builds its own).
    """
    from distributed import as_completed

    from .._utils import progress_bar

    if not hasattr(client, "submit") or not hasattr(client, "gather"):
        msg = f"client must be a dask.distributed Client, got {type(client).__name__}."
        raise TypeError(msg)
    per = int(spots_per_task) if spots_per_task is not None else 1024
    if per < 1:
        msg = f"spots_per_task must be ≥ 1, got {spots_per_task!r}."
        raise ValueError(msg)
    per = int(np.ceil(per / batch_size)) * batch_size  # whole batches: the same batches as one process
    # pixels already in memory travel once per section (scattered); images on disk travel as lazy references
    images = {s.library_id: client.scatter(_Pixels(s.image), hash=False)
              for s in todo if _in_memory(s.image_array())}
    todo = [dataclasses.replace(s, image=None) if s.library_id in images else s for s in todo]
    chunks = _chunks(todo, per)
    enc_ref = client.scatter(encoder, broadcast=True, hash=False) if encoder is not None else None
    futures = []
    for pieces in chunks:
        libs = {p.library_id for p in pieces}
        st = {k: v for k, v in stain.items() if k in libs} if isinstance(stain, Mapping) else stain
        imgs = {k: v for k, v in images.items() if k in libs}
        futures.append(client.submit(_embed_task, pieces, enc_ref, build, imgs, patch_um=patch_um, patch_px=patch_px,
                                     stain=st, batch_size=batch_size, accelerator=accelerator, amp=amp, pure=False))
    sizes = {f.key: sum(p.n_obs for p in c) for f, c in zip(futures, chunks, strict=True)}
    bar = progress_bar(as_completed(futures), desc="Embedding (dask)", total=len(futures), progress=progress)
    for _ in bar:
        pass
    out = client.gather(futures)
    for f, o in zip(futures, out, strict=True):
        if o.shape[0] != sizes[f.key]:  # pragma: no cover - a worker bug, not user input
            msg = f"a dask task returned {o.shape[0]} features for {sizes[f.key]} spots."
            raise RuntimeError(msg)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
