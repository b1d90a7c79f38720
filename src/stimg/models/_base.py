"""The one contract every trainable stimg model follows (DESIGN §3, issue 14).

* **Names.** ``train(max_epochs=None, *, train_indices=None, accelerator=None, devices=None,
  seed=None, progress=None, ...)``; ``train_indices`` takes integer positions, a boolean mask
  or the name of a boolean ``.obs`` column (e.g. ``"si_sampled"`` from
  :func:`stimg.tl.active_sample`), resolved by :func:`resolve_train_indices`.
* **Defaults.** ``accelerator``/``devices``/``seed`` left as ``None`` come from
  :attr:`stimg.settings` through :func:`train_defaults`.
* **Files.** ``model.save(path, overwrite=False)`` writes ONE file: a safetensors container of
  arrays plus a JSON header (format name, format version, model class, stimg version, the
  model's own header: init parameters, genes, embedding provenance ...). ``Model.load(path,
  adata=None)`` reads it back; :func:`load_model` dispatches on the class stored in the file.
  Nothing is ever unpickled: a file stimg did not write is refused with a clear error.
* **Provenance.** :func:`embedding_provenance` records which encoder, weights, patch µm and px
  produced the features a model was trained on; :func:`check_embedding` refuses to predict from
  features of another encoder.

A model implements ``_get_state() -> (header, tensors)`` and
``_from_state(header, tensors, adata=None, **kwargs)`` and inherits :class:`ModelIO`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .._settings import settings
from .._validate import assert_key_in

FORMAT = "stimg.model"
FORMAT_VERSION = 1
_MODEL_CLASSES: dict[str, type] = {}
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol ≥ 2, zip (torch.save)


#: Scalings of image features after centring them on the training spots (``standardize=`` of
#: :class:`~stimg.models.NBRegressor` and :class:`~stimg.models.ContrastiveAligner`): ``'isotropic'``
#: divides every feature by one scale, the mean per-feature SD — it keeps the encoder's geometry, so
#: smooth, low-variance features (e.g. :func:`stimg.pp.spatial_context` blocks) are not blown up and
#: a new section's shift stays small; ``'per_feature'`` gives z-scores.
FEATURE_SCALES = {
    "isotropic": lambda emb: np.full(emb.shape[1], float(emb.std(0).mean())),
    "per_feature": lambda emb: emb.std(0),
}


def check_standardize(standardize: str) -> str:
    """``standardize`` if it names a :data:`FEATURE_SCALES` entry, else a ``ValueError`` listing them."""
    if standardize not in FEATURE_SCALES:
        msg = f"standardize must be one of {sorted(FEATURE_SCALES)}, got {standardize!r}."
        raise ValueError(msg)
    return standardize


# --------------------------------------------------------------------------- training defaults
@dataclass(frozen=True)
class TrainDefaults:
    """Resolved ``accelerator``, ``devices`` and ``seed`` of a ``train`` call."""

    accelerator: str
    devices: int | str | list[int]
    seed: int


def train_defaults(accelerator: str | None = None, devices: int | str | list[int] | None = None,
                   seed: int | None = None) -> TrainDefaults:
    """Fill ``None`` from :attr:`stimg.settings` (``accelerator``, ``devices``, ``seed``)."""
    return TrainDefaults(
        accelerator=settings.accelerator if accelerator is None else accelerator,
        devices=getattr(settings, "devices", "auto") if devices is None else devices,
        seed=int(settings.seed if seed is None else seed),
    )


def resolve_train_indices(adata: Any, train_indices: Any, *, name: str = "train_indices") -> np.ndarray:
    """Sorted unique integer rows from ``None`` (all), an int array, a bool mask or a bool ``.obs`` column.

    Raises a clear error for an empty selection, out-of-range positions, a non-boolean column
    or a mask of the wrong length.
    """
    n = int(adata.n_obs)
    if isinstance(train_indices, str):
        assert_key_in(adata.obs, train_indices, where="adata.obs",
                      hint=f"Pass {name} as a boolean .obs column (e.g. 'si_sampled'), a mask or positions.")
        col = adata.obs[train_indices]
        if col.dtype != bool:
            msg = (f".obs[{train_indices!r}] must be boolean to select training spots, got dtype {col.dtype}; "
                   "convert it with .astype(bool) after checking it has no missing values.")
            raise TypeError(msg)
        train_indices = col.to_numpy()
    if train_indices is None:
        rows = np.arange(n)
    else:
        arr = np.asarray(train_indices)
        if arr.dtype == bool:
            if arr.shape != (n,):
                msg = f"boolean {name} must have one entry per spot ({n}), got shape {arr.shape}."
                raise ValueError(msg)
            rows = np.flatnonzero(arr)
        else:
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                if not np.all(np.equal(np.mod(arr, 1), 0)):
                    msg = f"{name} must be integer positions or a boolean mask, got dtype {arr.dtype}."
                    raise TypeError(msg)
            rows = arr.astype(np.int64).ravel()
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                msg = f"{name} must lie in [0, {n}), got range [{rows.min()}, {rows.max()}]."
                raise ValueError(msg)
            rows = np.unique(rows)
    if rows.size == 0:
        msg = ("the table has no spots to train on; check the filtering that produced it." if n == 0 else
               f"{name} selects no spot; select at least one spot to train on.")
        raise ValueError(msg)
    return rows


def check_trained(model: Any, what: str = "predict") -> None:
    """Raise a :class:`RuntimeError` when ``model.is_trained_`` is false."""
    if not getattr(model, "is_trained_", False):
        how = ".fit(...)" if hasattr(model, "fit") and not hasattr(model, "train") else ".train()"
        msg = f"{type(model).__name__} is not trained; call {how} (or load a saved model) before {what}."
        raise RuntimeError(msg)


# --------------------------------------------------------------------------- provenance
def embedding_provenance(adata: Any, embedding_key: str) -> dict[str, Any]:
    """What produced ``adata.obsm[embedding_key]``: encoder, weights identity, patch µm/px, dim.

    Read from ``adata.uns[embedding_key]['params']`` as written by :func:`stimg.pp.embed`; keys
    not known (features computed elsewhere) are ``None``.
    """
    params = {}
    uns = getattr(adata, "uns", {})
    if embedding_key in uns and isinstance(uns[embedding_key], dict):
        params = dict(uns[embedding_key].get("params", {}) or {})
    dim = None
    if embedding_key in getattr(adata, "obsm", {}):
        dim = int(np.shape(adata.obsm[embedding_key])[1])
    return {
        "embedding_key": embedding_key,
        "encoder": params.get("encoder"),
        "encoder_identity": params.get("encoder_identity"),
        "patch_um": None if params.get("patch_um") is None else float(params["patch_um"]),
        "patch_px": None if params.get("patch_px") is None else int(params["patch_px"]),
        "stain": params.get("stain") if isinstance(params.get("stain"), str | type(None)) else "per-section",
        "dim": dim,
        "context": _context_signature(params),
    }


def _context_signature(params: dict[str, Any]) -> str | None:
    """How features were derived from embeddings (si.pp.spatial_context / combine_features), or ``None``."""
    fn = params.get("function")
    if fn == "spatial_context":
        return f"spatial_context({params.get('embedding_key')}, radius_um={list(params.get('radius_um', []))}, " \
               f"method={params.get('method')!r})"
    if fn == "combine_features":
        return f"combine_features({list(params.get('keys', []))})"
    return None


def check_embedding(adata: Any, provenance: dict[str, Any], *, embedding_key: str | None = None) -> str:
    """Check that ``adata`` holds features from the encoder a model was trained with; return the key.

    Compares encoder name, weights identity, patch µm and px when ``adata.uns`` records them
    (written by :func:`stimg.pp.embed`), and the feature dimension always.
    """
    key = embedding_key or provenance.get("embedding_key")
    enc = provenance.get("encoder")
    how = (f"si.pp.embed(data, {enc!r}, patch_um={provenance.get('patch_um')}, patch_px={provenance.get('patch_px')})"
           if enc else "the encoder used for training")
    assert_key_in(adata.obsm, key, where="adata.obsm", hint=f"Embed the new data with {how}.")
    got = embedding_provenance(adata, key)
    if provenance.get("dim") is not None and got["dim"] != provenance["dim"]:
        msg = (f"adata.obsm[{key!r}] has {got['dim']} features but the model was trained on {provenance['dim']} "
               f"({enc or 'unknown encoder'}); embed with {how}.")
        raise ValueError(msg)
    for field in ("encoder", "encoder_identity", "patch_um", "patch_px", "context"):
        want, have = provenance.get(field), got.get(field)
        if want is not None and have is not None and want != have:
            fix = f"derive it the same way: {want}" if field == "context" else f"embed the new data with {how}"
            msg = (f"adata.obsm[{key!r}] was computed with {field}={have!r} but the model was trained with "
                   f"{field}={want!r}; {fix}.")
            raise ValueError(msg)
    return key


# --------------------------------------------------------------------------- file format
def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    msg = f"cannot store {type(o).__name__} in a stimg model header; store arrays as tensors."
    raise TypeError(msg)


def write_model_file(path: str | os.PathLike, *, model_class: str, header: dict[str, Any],
                     tensors: dict[str, Any], overwrite: bool = False) -> Path:
    """Write ``tensors`` (arrays) and ``header`` (JSON) to one safetensors file, atomically."""
    import torch
    from safetensors.torch import save_file

    from .. import __version__

    path = Path(path)
    if path.is_dir():
        msg = f"{str(path)!r} is a directory; pass a file path such as {str(path / 'model.stimg')!r}."
        raise IsADirectoryError(msg)
    if path.exists() and not overwrite:
        msg = f"{str(path)!r} exists; pass overwrite=True to replace it."
        raise FileExistsError(msg)
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        t = v.detach().cpu() if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
        out[k] = t.contiguous().clone() if not t.is_contiguous() else t.contiguous()
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_class": model_class,
        "stimg_version": str(__version__),
        "header": json.dumps(header, default=_json_default),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        # safetensors refuses tensors that share memory; clone views of one buffer
        seen: set[int] = set()
        for k, t in out.items():
            ptr = t.untyped_storage().data_ptr() if t.numel() else -1
            if ptr in seen:
                out[k] = t.clone()
            seen.add(ptr)
        save_file(out, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_model_file(path: str | os.PathLike, *, model_class: str | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """Read a file written by :func:`write_model_file`: ``(header, tensors, meta)``.

    Never unpickles anything. A missing file, a file of another format (pickle, ``torch.save``,
    joblib), a truncated file, a newer format version or another model class each raise an error
    that names the problem.
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        cands = sorted(path.glob("*.stimg"))
        hint = f" It holds {[c.name for c in cands]}." if cands else ""
        msg = f"{str(path)!r} is a directory; pass the model file written by .save().{hint}"
        raise IsADirectoryError(msg)
    if not path.is_file():
        msg = f"model file {str(path)!r} not found."
        raise FileNotFoundError(msg)
    with open(path, "rb") as fh:
        head = fh.read(9)
    # a safetensors file starts with its header length (u64, little endian) and then '{'; that length's
    # first byte may well be 0x80, so recognise safetensors before looking for pickle's magic byte
    n_header = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
    looks_safetensors = head[8:9] == b"{" and 0 < n_header <= path.stat().st_size - 8
    if not looks_safetensors and head.startswith(_PICKLE_MAGIC):
        msg = (f"{str(path)!r} is a pickle/torch.save/joblib file, not a stimg model file; stimg never unpickles "
               "files (that could run code). Re-save the model with this stimg version's .save().")
        raise ValueError(msg)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # safetensors raises SafetensorError / OSError on truncated or foreign files
        size = path.stat().st_size
        msg = (f"{str(path)!r} ({size} bytes) is not a readable stimg model file: it is truncated, corrupt or "
               f"of another format ({type(e).__name__}: {e}). Save the model again with .save().")
        raise ValueError(msg) from None
    if meta.get("format") != FORMAT:
        msg = f"{str(path)!r} is a safetensors file but not a stimg model file (no {FORMAT!r} header)."
        raise ValueError(msg)
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        msg = (f"{str(path)!r} uses stimg model format {version}, newer than this stimg understands "
               f"({FORMAT_VERSION}); upgrade stimg (file written by stimg {meta.get('stimg_version')}).")
        raise ValueError(msg)
    stored = meta.get("model_class")
    if model_class is not None and stored != model_class:
        msg = (f"{str(path)!r} holds a {stored}, not a {model_class}; load it with si.models.{stored}.load "
               "or si.models.load_model.")
        raise ValueError(msg)
    try:
        header = json.loads(meta.get("header", "{}"))
    except json.JSONDecodeError as e:
        msg = f"{str(path)!r} has a corrupt header: {e}."
        raise ValueError(msg) from None
    return header, tensors, meta


def load_model(path: str | os.PathLike, adata: Any = None, **kwargs: Any) -> Any:
    """Load any stimg model file, whatever its class.

    Parameters
    ----------
    path
        File written by a model's ``save``.
    adata
        Optional table to attach (models that predict from ``.obsm`` do not need it).
    **kwargs
        Passed to the class's ``load``.

    Examples
    --------
    >>> model = si.models.load_model("her2st_nb.stimg")  # doctest: +SKIP
    """
    _, _, meta = _peek(path)
    name = meta.get("model_class")
    if name not in _MODEL_CLASSES:
        import importlib

        from . import _LAZY

        if name in _LAZY:  # import the module that defines it (registers the class)
            importlib.import_module(_LAZY[name], __package__)
    if name not in _MODEL_CLASSES:
        msg = f"{str(path)!r} holds a model of class {name!r}, which this stimg does not know."
        raise ValueError(msg)
    return _MODEL_CLASSES[name].load(path, adata, **kwargs)


def _peek(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    return read_model_file(path)


class ModelIO:
    """Mixin: ``save``/``load`` through the one safe file format.

    Subclasses implement :meth:`_get_state` and :meth:`_from_state`; the class name is stored in
    the file and the class is registered for :func:`load_model`.
    """

    _model_class: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _MODEL_CLASSES[cls._file_class()] = cls

    @classmethod
    def _file_class(cls) -> str:
        return cls.__dict__.get("_model_class") or cls.__name__

    def _get_state(self) -> tuple[dict[str, Any], dict[str, Any]]:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def _from_state(cls, header: dict[str, Any], tensors: dict[str, Any], adata: Any = None,
                    **kwargs: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model to one file (safetensors arrays + JSON header; no pickle).

        Parameters
        ----------
        path
            File to write (conventionally ``*.stimg``).
        overwrite
            Replace an existing file.

        Returns
        -------
        The path written.
        """
        check_trained(self, "save")
        header, tensors = self._get_state()
        return write_model_file(path, model_class=self._file_class(), header=header, tensors=tensors,
                                overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, adata: Any = None, **kwargs: Any) -> Any:
        """Load a model written by :meth:`save`.

        Parameters
        ----------
        path
            File written by :meth:`save`.
        adata
            Optional table to attach to the model.
        **kwargs
            Model-specific options.
        """
        header, tensors, _ = read_model_file(path, model_class=cls._file_class())
        return cls._from_state(header, tensors, adata, **kwargs)
