"""Work on slides through a ``dask.distributed`` cluster (DESIGN §7): the shared plumbing and the embed tasks.

:func:`run_tasks` submits tasks and gathers their results (one progress bar, client checked); each
task runs in the worker under :func:`_in_worker`, which reads lazy images with dask's synchronous
scheduler and lets glibc's allocator keep freed memory for the task's duration (dask's Nanny starts
workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which fixes glibc's mmap threshold at 128 KiB: every
batch's patches and activations were then mapped and faulted in afresh, ~25 % more CPU per spot).
Used by :func:`stimg.pp.embed` and :func:`stimg.pp.tile_image`.

Embedding: the driver only plans: it splits the spots still to embed into chunks of whole batches (in the
order the single-process path batches them, so every patch meets the same batch-mates and the
features are bit-identical at equal threads per process), and submits one task per chunk. Each
task gets the spots' centres and a *lazy* reference to their section images; in the worker it
reads each image chunk its patch windows touch once, cuts the patches and runs the encoder. Images
on disk (zarr-backed SpatialData, WSIs opened lazily) are read only in the workers; the driver never
holds pixels, only the returned features.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from .._spatial import Section

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_MALLOC_LOCK = threading.Lock()
_MALLOC_USERS = [0]


def _libc() -> Any:
    """The C library when it is glibc (has ``mallopt`` and ``malloc_trim``), else ``None``."""
    import ctypes
    import ctypes.util

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None
    except OSError:  # pragma: no cover - not glibc
        return None


@contextmanager
def _task_malloc() -> Iterator[None]:
    """For a task's duration, let glibc reuse freed memory as a default process does; restore and trim after.

    Only where the process was started with a fixed ``MALLOC_TRIM_THRESHOLD_`` (dask's Nanny sets
    65536): that also fixes the mmap threshold at 128 KiB, so every large buffer (resized patches,
    batches, activations) is mapped and page-faulted anew. During the task the thresholds are 32 MiB
    (glibc's dynamic maximum) and 64 MiB; when the worker's last running task ends they return to
    the environment's values and freed memory goes back to the system (``malloc_trim``), as the
    Nanny intends. Threads of one worker share the setting (counted).
    """
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    lib = _libc() if trim is not None else None
    if lib is None:
        yield
        return
    with _MALLOC_LOCK:
        _MALLOC_USERS[0] += 1
        if _MALLOC_USERS[0] == 1:
            lib.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
            lib.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)
    try:
        yield
    finally:
        with _MALLOC_LOCK:
            _MALLOC_USERS[0] -= 1
            if _MALLOC_USERS[0] == 0:
                lib.mallopt(_M_TRIM_THRESHOLD, int(trim))
                lib.mallopt(_M_MMAP_THRESHOLD, int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 128 * 2**10)))
                lib.malloc_trim(0)


def _in_worker(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` in a worker: lazy (dask) image reads happen here, synchronously; allocator as in one process."""
    import dask

    with dask.config.set(scheduler="synchronous"), _task_malloc():
        return fn(*args, **kwargs)


def check_client(client: Any) -> None:
    """Raise unless ``client`` looks like a :class:`dask.distributed.Client`."""
    if not hasattr(client, "submit") or not hasattr(client, "gather"):
        msg = (f"client must be a dask.distributed Client, got {type(client).__name__}; "
               "pass e.g. dask.distributed.Client(n_workers=2), or client=None for one process.")
        raise TypeError(msg)


def run_tasks(client: Any, fn: Callable, tasks: Sequence[tuple[tuple, dict]], *, desc: str,
              progress: bool | None) -> list:
    """Results of ``fn(*args, **kwargs)`` for each ``(args, kwargs)`` of ``tasks``, run on ``client``'s workers (in order)."""
    from distributed import as_completed

    from .._utils import progress_bar

    check_client(client)
    futures = [client.submit(_in_worker, fn, *args, pure=False, **kwargs) for args, kwargs in tasks]
    for _ in progress_bar(as_completed(futures), desc=desc, total=len(futures), progress=progress):
        pass
    return client.gather(futures)


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
    """Run in a worker (under :func:`_in_worker`): cut the chunk's patches from the (lazy) images and encode them."""
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
    local = [dataclasses.replace(p, image=_prefetch(p, patch_um)) for p in local]  # lazy reads, in this worker
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
    check_client(client)
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
    tasks = []
    for pieces in chunks:
        libs = {p.library_id for p in pieces}
        st = {k: v for k, v in stain.items() if k in libs} if isinstance(stain, Mapping) else stain
        imgs = {k: v for k, v in images.items() if k in libs}
        tasks.append(((pieces, enc_ref, build, imgs), {"patch_um": patch_um, "patch_px": patch_px, "stain": st,
                                                       "batch_size": batch_size, "accelerator": accelerator,
                                                       "amp": amp}))
    out = run_tasks(client, _embed_task, tasks, desc="Embedding (dask)", progress=progress)
    for pieces, o in zip(chunks, out, strict=True):
        if o.shape[0] != (size := sum(p.n_obs for p in pieces)):  # pragma: no cover - a worker bug, not user input
            msg = f"a dask task returned {o.shape[0]} features for {size} spots."
            raise RuntimeError(msg)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
