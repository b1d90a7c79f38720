"""Image embeddings of µm-true patches around spots → ``.obsm['X_<encoder>']`` (torch imported lazily)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from .._constants import TABLE_KEY
from .._docs import d
from .._logging import log_added, logger
from .._settings import settings
from .._spatial import Section, get_table, sections
from ._patches import check_spots_on_image

# feature cache: key → {"xy": (m, 2) float64, "feats": (m, d) float32}; kept small (LRU)
_FEATURES: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
_FEATURES_MAX = 64
# built encoders: identity → Encoder (LRU of 2: foundation models are large)
_BUILT: OrderedDict[str, Any] = OrderedDict()


def clear_cache() -> None:
    """Forget cached features and built encoders (in memory; on-disk caches stay).

    Examples
    --------
    >>> import stimg as si
    >>> si.pp.embed.clear_cache()  # doctest: +SKIP
    """
    _FEATURES.clear()
    _BUILT.clear()


def _hash(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x1f")
    return h.hexdigest()


def _image_fingerprint(sec: Section) -> str:
    arr = sec.image_array()
    name = getattr(arr, "name", None)  # dask: a deterministic token of the graph / data
    if isinstance(name, str) and not isinstance(arr, np.ndarray):
        return f"dask:{name}:{tuple(arr.shape)}"
    a = np.asarray(arr)
    sy, sx = max(1, a.shape[1] // 97), max(1, a.shape[2] // 89)
    sample = np.ascontiguousarray(a[:, ::sy, ::sx])
    return "np:" + hashlib.blake2b(sample.tobytes(), digest_size=12).hexdigest() + f":{a.shape}"


def _encoder_identity(model: Any, weights: Any, pretrained: bool, model_kwargs: dict) -> tuple[str | None, str | None]:
    """(name, identity) of a registry/timm name without building it; ``(None, None)`` for modules."""
    if not isinstance(model, str) or isinstance(weights, dict):
        return None, None
    w = None
    if weights is not None:
        p = Path(weights).expanduser()
        w = f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.exists() else str(p)
    return model, _hash(model, w, pretrained, sorted(model_kwargs.items()))


def _get_encoder(model, weights, pretrained, model_kwargs, ident):
    from ..encoders import get_encoder

    if ident is not None and ident in _BUILT:
        _BUILT.move_to_end(ident)
        return _BUILT[ident]
    enc = get_encoder(model, weights=weights, pretrained=pretrained, **model_kwargs)
    if ident is not None:
        _BUILT[ident] = enc
        while len(_BUILT) > 2:
            _BUILT.popitem(last=False)
    return enc


def _stain_key(stain: Callable | None) -> tuple[str, bool]:
    """(cache key of the stain setting, whether it is stable across processes)."""
    if stain is None:
        return "none", True
    key = getattr(stain, "cache_key", None)
    if key is not None:
        return str(key), True
    return f"{getattr(stain, '__qualname__', type(stain).__name__)}@{id(stain)}", False


class _FeatureCache:
    """Per-section features keyed by spot centre, in memory and optionally on disk."""

    def __init__(self, cache_dir: str | os.PathLike | None, persistent: bool) -> None:
        self.dir = Path(cache_dir).expanduser() if cache_dir is not None and persistent else None

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        if key in _FEATURES:
            _FEATURES.move_to_end(key)
            return _FEATURES[key]
        if self.dir is not None and (f := self.dir / f"{key}.npz").exists():
            with np.load(f) as z:
                entry = {"xy": z["xy"], "feats": z["feats"]}
            self._remember(key, entry)
            return entry
        return None

    def _remember(self, key: str, entry: dict[str, np.ndarray]) -> None:
        _FEATURES[key] = entry
        while len(_FEATURES) > _FEATURES_MAX:
            _FEATURES.popitem(last=False)

    def put(self, key: str, xy: np.ndarray, feats: np.ndarray, meta: dict) -> None:
        old = self.get(key)
        if old is not None and old["feats"].shape[1] == feats.shape[1]:
            xy, feats = np.concatenate([old["xy"], xy]), np.concatenate([old["feats"], feats])
        entry = {"xy": xy, "feats": feats}
        self._remember(key, entry)
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f"{key}.tmp.npz"
            np.savez(tmp, xy=xy, feats=feats)
            os.replace(tmp, self.dir / f"{key}.npz")
            (self.dir / f"{key}.json").write_text(json.dumps(meta, default=str))


def _lookup(entry: dict[str, np.ndarray] | None, xy: np.ndarray) -> np.ndarray:
    """Row of each centre in the cache entry (−1 when absent); centres match to 1e-3 px."""
    if entry is None or len(entry["xy"]) == 0:
        return np.full(len(xy), -1)
    index = {tuple(r): i for i, r in enumerate(np.rint(entry["xy"] * 1000).astype(np.int64).tolist())}
    return np.array([index.get(tuple(r), -1) for r in np.rint(xy * 1000).astype(np.int64).tolist()], dtype=int)


def _amp_dtype(device, amp: bool | None):
    import torch

    if amp is False or (amp is None and device.type != "cuda"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def run_encoder(enc, dataset, *, batch_size: int, num_workers: int, device, amp_dtype=None,
                progress: bool | None = None) -> np.ndarray:
    """Forward every item of ``dataset`` through ``enc``: uint8 batches are normalised on the device.

    The model runs channels-last; on CUDA the loader pins memory, batches are copied asynchronously,
    the model runs under autocast and outputs stay on the device until the end (no per-batch
    synchronisation).
    """
    import torch
    from torch.utils.data import DataLoader

    from .._utils import progress_bar

    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=cuda,
                        collate_fn=getattr(dataset, "collate", None),
                        prefetch_factor=4 if num_workers > 0 else None, persistent_workers=False)
    enc = enc.to(device).eval()
    fmt = torch.channels_last  # NHWC: faster on GPUs and, through oneDNN, for CPU depthwise convolutions
    enc = enc.to(memory_format=fmt)
    amp_ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    outs = []
    with torch.inference_mode(), amp_ctx:
        for xb in progress_bar(loader, desc=f"Embedding ({enc.name})", total=len(loader), progress=progress):
            xb = xb.to(device, non_blocking=cuda).contiguous(memory_format=fmt)  # uint8: cheap to re-layout
            outs.append(enc(enc.preprocess(xb)))
    if not outs:
        return np.zeros((0, enc.dim), np.float32)
    return torch.cat(outs).float().cpu().numpy()


@d.dedent
def embed(
    data: Any,
    model: Any = "efficientnet_lite0",
    *,
    patch_um: float = 112.0,
    patch_px: int | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    accelerator: str | None = None,
    amp: bool | None = None,
    stain: Callable[[np.ndarray], np.ndarray] | Mapping[str, Callable] | None = None,
    weights: str | os.PathLike | dict | None = None,
    pretrained: bool = True,
    model_kwargs: dict | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    table_key: str = TABLE_KEY,
    library_id: str | Sequence[str] | None = None,
    library_key: str | None = None,
    image_key: str | dict | None = None,
    spot_diameter_um: float | None = None,
    key_added: str | None = None,
    inplace: bool = True,
    progress: bool | None = None,
    client: Any = None,
    spots_per_task: int | None = None,
) -> np.ndarray | None:
    """Embed a ``patch_um`` µm patch around every spot with a frozen image encoder.

    Patches are cut at their physical size from each section image (:func:`stimg.pp.extract_patches`),
    resized to the encoder's input, normalised on the device and passed through the encoder in
    batches. Features are cached per (encoder and weights, patch µm, patch px, stain setting,
    image, spot centre): a repeated call, or one on a subset of spots, computes nothing new.

    Parameters
    ----------
    %(data)s
    model
        Encoder: a name of :func:`stimg.encoders.list_encoders` (default: the offline ImageNet
        EfficientNet-Lite0), any timm architecture, a :class:`torch.nn.Module` returning
        ``(batch, dim)`` features from ImageNet-normalised input, or a
        :class:`stimg.encoders.Encoder` (carrying its own transform).
    patch_um
        Side of the patch in µm (HEST: 112 µm).
    patch_px
        Side of the patch in pixels; ``None`` uses the encoder's input size (224 for most).
    batch_size
        ``None`` uses :attr:`stimg.settings.batch_size`.
    num_workers
        DataLoader workers cutting patches. ``None`` uses :attr:`stimg.settings.num_workers` on CPU
        (0 is fastest when the model already occupies every core) and up to 8 on a GPU.
    accelerator
        ``'auto'``, ``'cpu'``, ``'cuda'``/``'gpu'`` or ``'mps'``; ``None`` uses :attr:`stimg.settings.accelerator`.
    amp
        Mixed precision (bfloat16, or float16 where bfloat16 is unsupported). ``None``: on GPU only.
    stain
        Per-patch stain normaliser ``(y, x, 3) uint8 → (y, x, 3) uint8``, or a dict of them per
        section as returned by :func:`stimg.pp.stain_normalize` with ``inplace=False``; a
        normaliser's ``cache_key`` attribute, when present, keys the cache.
    weights
        Local weights for a registry encoder (gated foundation models offline); see
        :func:`stimg.encoders.get_encoder`.
    pretrained
        ``False`` uses random weights of the same architecture (a control).
    model_kwargs
        Extra arguments of :func:`stimg.encoders.get_encoder` (timm ``create_model`` overrides).
    cache
        Reuse and store features in the in-memory cache.
    cache_dir
        Also keep features on disk here (one ``.npz`` per encoder × patch setting × image).
    %(table_key)s
    %(library_id)s
    %(library_key)s
    %(image_key)s
    spot_diameter_um
        Physical spot diameter when the table does not record it.
    key_added
        ``.obsm`` key; ``None`` gives ``'X_<encoder name>'``.
    %(inplace)s
    %(progress)s
    client
        A :class:`dask.distributed.Client`: embed through its cluster, one task per
        ``spots_per_task`` spots; each task reads its patches from the (lazy) section images and
        runs the encoder in the worker (built there from its name, or sent once if a module). The
        driver never reads pixels, so images on disk (zarr-backed SpatialData, WSIs) stay out of
        its memory; in-memory images are sent to the workers with the tasks. Features equal the
        single-process ones bit for bit at the same threads per process. ``None`` (default):
        embed in this process.
    spots_per_task
        Spots per dask task (rounded up to whole batches); ``None``: 1024.

    Returns
    -------
    With ``inplace=False`` the ``(n_obs, dim)`` float32 features (NaN rows for spots of sections
    not embedded). Otherwise ``None``, and the table gets

    - ``.obsm[key_added]``: float32 features (rows of other sections keep earlier values, else NaN),
    - ``.uns[key_added]['params']``: encoder, weights identity, patch µm/px, stain, device, AMP,
      batch size, and how many spots came from the cache.

    Examples
    --------
    >>> import stimg as si
    >>> sdata = si.datasets.synthetic(16, 5)
    >>> si.pp.embed(sdata, patch_px=64, progress=False)  # doctest: +SKIP
    >>> sdata.tables["table"].obsm["X_efficientnet_lite0"].shape  # doctest: +SKIP
    (16, 1280)
    >>> from dask.distributed import Client  # doctest: +SKIP
    >>> si.pp.embed(sdata, client=Client(n_workers=2, threads_per_worker=1))  # doctest: +SKIP
    """
    start = time.perf_counter()
    if not (np.isfinite(patch_um) and patch_um > 0):
        msg = f"patch_um must be a positive size in µm, got {patch_um!r}."
        raise ValueError(msg)
    if patch_px is not None and int(patch_px) < 8:
        msg = f"patch_px must be ≥ 8 pixels, got {patch_px!r}."
        raise ValueError(msg)
    bs = int(settings.batch_size if batch_size is None else batch_size)
    if bs < 1:
        msg = f"batch_size must be ≥ 1, got {batch_size!r}."
        raise ValueError(msg)
    if num_workers is not None and int(num_workers) < 0:
        msg = f"num_workers must be ≥ 0, got {num_workers!r}."
        raise ValueError(msg)
    if stain is not None and not callable(stain) and not isinstance(stain, Mapping):
        msg = (f"stain must be a function of a (y, x, 3) uint8 patch or a dict of them per section, "
               f"got {type(stain).__name__}.")
        raise TypeError(msg)
    from .._utils import resolve_device

    device = resolve_device(accelerator) if client is None else None  # workers resolve their own
    model_kwargs = dict(model_kwargs or {})
    table = get_table(data, table_key)
    secs = sections(data, table_key=table_key, library_id=library_id, library_key=library_key, image_key=image_key,
                    spot_diameter_um=spot_diameter_um)
    check_spots_on_image(secs)

    name, ident = _encoder_identity(model, weights, pretrained, model_kwargs)
    enc = None
    if ident is None:  # a module or dict weights: fingerprint the built encoder
        enc = _get_encoder(model, weights, pretrained, model_kwargs, None)
        name, ident = enc.name, enc.cache_key
    if patch_px is None:
        if enc is None:
            from ..encoders import ENCODERS

            spec = ENCODERS.get(name)
            if spec is None:  # unregistered timm name: the built model knows its input size
                enc = _get_encoder(model, weights, pretrained, model_kwargs, ident)
            patch_px = spec.input_px if spec is not None else enc.input_px
        else:
            patch_px = enc.input_px
    patch_px = int(patch_px)
    if isinstance(stain, Mapping):  # one normaliser per section (si.pp.stain_normalize(inplace=False))
        if missing := [sec.library_id for sec in secs if sec.library_id not in stain]:
            msg = f"stain has no normaliser for sections {missing}; fit it on every section embedded."
            raise KeyError(msg)
        keys = {sec.library_id: _stain_key(stain[sec.library_id]) for sec in secs}
    else:
        keys = {sec.library_id: _stain_key(stain) for sec in secs}
    skeys = {lib: k for lib, (k, _) in keys.items()}
    skey = skeys[secs[0].library_id] if len(set(skeys.values())) == 1 else skeys
    store = _FeatureCache(cache_dir, persistent=all(stable for _, stable in keys.values()))
    key_added = key_added or f"X_{name}"

    # cache look-up per section
    plans = []
    for s in secs:
        ckey = _hash(ident, float(patch_um), patch_px, skeys[s.library_id], _image_fingerprint(s), float(s.mpp))
        entry = store.get(ckey) if cache else None
        rows = _lookup(entry, s.xy)
        plans.append((s, ckey, entry, rows))
    n_hit = int(sum((r >= 0).sum() for *_, r in plans))
    todo = [dataclasses.replace(s, obs_index=s.obs_index[r < 0], xy=s.xy[r < 0]) for s, _, _, r in plans]
    todo = [s for s in todo if s.n_obs]
    new = None
    if todo and client is not None:
        from ._distributed import embed_distributed

        if enc is None and not pretrained:  # random weights: build once here so every worker uses the same
            enc = _get_encoder(model, weights, pretrained, model_kwargs, ident)
        new = embed_distributed(client, todo, encoder=enc, build=(model, weights, pretrained, model_kwargs, ident),
                                patch_um=patch_um, patch_px=patch_px, stain=stain, batch_size=bs,
                                accelerator=accelerator, amp=amp, spots_per_task=spots_per_task, progress=progress)
    elif todo:
        if enc is None:
            enc = _get_encoder(model, weights, pretrained, model_kwargs, ident)
        from ._patch_dataset import PatchDataset

        ds = PatchDataset(todo, table.obs_names.to_numpy(), patch_um=patch_um, patch_px=patch_px, stain=stain)
        if num_workers is None:
            nw = settings.num_workers if device.type == "cpu" else max(settings.num_workers, min(8, os.cpu_count() or 1))
        else:
            nw = int(num_workers)
        new = run_encoder(enc, ds, batch_size=bs, num_workers=nw, device=device,
                          amp_dtype=_amp_dtype(device, amp), progress=progress)
    if new is not None:
        if not np.isfinite(new).all():
            msg = (f"Encoder {name!r} produced non-finite features for {int((~np.isfinite(new).all(1)).sum())} "
                   "patches; try amp=False.")
            raise ValueError(msg)
    dim = new.shape[1] if new is not None else next(e["feats"].shape[1] for _, _, e, r in plans if (r >= 0).any())

    out = np.full((table.n_obs, dim), np.nan, dtype=np.float32)
    if inplace and key_added in table.obsm and np.shape(table.obsm[key_added]) == out.shape:
        out[:] = np.asarray(table.obsm[key_added], dtype=np.float32)
    offset = 0
    meta = {"encoder": name, "identity": ident, "patch_um": patch_um, "patch_px": patch_px, "stain": skey}
    for s, ckey, entry, rows in plans:
        hit = rows >= 0
        if hit.any():
            out[s.obs_index[hit]] = entry["feats"][rows[hit]]
        n_miss = int((~hit).sum())
        if n_miss:
            f = new[offset:offset + n_miss]
            out[s.obs_index[~hit]] = f
            offset += n_miss
            if cache:
                store.put(ckey, s.xy[~hit], f.astype(np.float32), {**meta, "library_id": s.library_id})
    where = str(device) if client is None else f"dask ({accelerator or settings.accelerator} on the workers)"
    logger.info("embedded %d spots with %s (%d from cache) on %s", sum(s.n_obs for s in secs), name, n_hit, where)
    if not inplace:
        return out
    table.obsm[key_added] = out
    table.uns[key_added] = {"params": {
        "encoder": name, "encoder_identity": ident, "weights": None if weights is None or isinstance(weights, dict) else str(weights),
        "pretrained": bool(pretrained), "patch_um": float(patch_um), "patch_px": patch_px, "stain": skey,
        "batch_size": bs, "device": where,
        "amp": str(_amp_dtype(device, amp)) if client is None else str(amp), "dim": int(dim),
        "library_id": [s.library_id for s in secs], "image_key": [s.image_key for s in secs],
        "n_from_cache": n_hit, "n_computed": int(sum(s.n_obs for s in todo)),
    }}
    log_added("obsm", key_added, start)
    return None


embed.clear_cache = clear_cache  # type: ignore[attr-defined]
