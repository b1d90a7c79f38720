"""Sampler plug-ins: the context a sampler sees, the protocol it follows, and the registry.

A *sampler* chooses which spots to sequence next. It gets a :class:`SamplingContext` (image
embeddings, coordinates, the expression of spots already measured, the budget, a random
generator) and returns the indices of ``ctx.budget`` spots it chooses — as one array, or as a
list of arrays, one per internal round. :func:`stimg.tl.active_sample` and
:func:`stimg.tl.simulate_sampling` run any registered sampler by name, or a sampler object
passed directly. No torch here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp


@dataclass(eq=False)
class SamplingContext:
    """What a sampler may use to choose the next ``budget`` spots.

    Expression is guarded: :meth:`expression` returns counts only of spots that are *known* —
    measured before the call (``measured``) or revealed during it with :meth:`reveal`, which only
    ``mode='simulate'`` allows. A sampler can therefore never read a spot it has not chosen.

    Attributes
    ----------
    n_obs
        Number of spots (rows of the table).
    budget
        Number of new spots to choose.
    rng
        Random generator (seeded by ``active_sample(seed=)``).
    seed
        The integer seed (for libraries that take one).
    mode
        ``'simulate'`` (expression of every spot is in the table, revealed as spots are chosen) or
        ``'propose'`` (only ``measured`` spots have expression; one batch is proposed).
    measured
        Boolean mask of spots measured before this call (never chosen again).
    coordinates
        ``(n_obs, 2)`` spot centres in *tissue units*: per section, shifted to 0 and divided by the
        square root of the section's bounding-box area; sections are placed 10 units apart.
    groups
        Integer section of each spot (``0 … n_sections − 1``).
    sections
        Section names, indexed by ``groups``.
    var_names
        Genes of :meth:`expression`'s columns.
    progress
        Whether a long sampler may show one progress bar.
    info
        Free-form facts the sampler wants recorded in ``.uns[key_added]['params']`` (JSON-able).
    records
        Per-round records (see :meth:`record`), stored as ``.uns[key_added]['rounds']``.
    """

    n_obs: int
    budget: int
    rng: np.random.Generator
    seed: int
    mode: str
    measured: np.ndarray
    coordinates: np.ndarray
    groups: np.ndarray
    sections: list[str]
    var_names: Any
    progress: bool | None = None
    info: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    _embedding: Callable[[], tuple[str, np.ndarray]] | None = field(default=None, repr=False)
    _counts: Any = field(default=None, repr=False)
    _known: np.ndarray | None = field(default=None, repr=False)
    _emb_cache: tuple[str, np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.measured = np.asarray(self.measured, dtype=bool)
        self._known = self.measured.copy()

    # ---------------------------------------------------------------- image
    @property
    def embedding(self) -> np.ndarray:
        """``(n_obs, d)`` float32 image embedding, resolved on first use.

        Samplers that never touch it, such as ``'random'`` and ``'grid'``, need none.
        """
        if self._emb_cache is None:
            if self._embedding is None:
                msg = "This sampling context has no image embedding; pass embedding_key= or run si.pp.embed."
                raise KeyError(msg)
            key, emb = self._embedding()
            self._emb_cache = (key, np.asarray(emb, dtype=np.float32))
        return self._emb_cache[1]

    @property
    def embedding_key(self) -> str | None:
        """``.obsm`` key of the embedding, once :attr:`embedding` was used (else ``None``)."""
        return None if self._emb_cache is None else self._emb_cache[0]

    # ---------------------------------------------------------------- spots
    @property
    def known(self) -> np.ndarray:
        """Boolean mask of spots whose expression may be read (measured or revealed)."""
        return self._known.copy()

    @property
    def free(self) -> np.ndarray:
        """Indices of spots that may be chosen (not measured before this call)."""
        return np.flatnonzero(~self.measured)

    @property
    def can_reveal(self) -> bool:
        """``True`` in simulate mode: a sampler may reveal its picks round by round."""
        return self.mode == "simulate"

    def reveal(self, idx: np.ndarray) -> None:
        """Mark chosen spots as measured within this call (simulate mode only).

        Raises
        ------
        RuntimeError
            In propose mode, where unmeasured spots have no expression yet.
        """
        if not self.can_reveal:
            msg = ("In mode='propose' only spots measured before the call have expression; propose one batch "
                   "(rounds happen in the lab: sequence it, then call active_sample again).")
            raise RuntimeError(msg)
        self._known[np.asarray(idx, dtype=np.int64)] = True

    def expression(self, idx: np.ndarray) -> np.ndarray:
        """Raw counts ``(len(idx), n_genes)`` (dense float32) of known spots ``idx``.

        Raises
        ------
        PermissionError
            If any of ``idx`` is neither measured nor revealed.
        ValueError
            If the counts are not finite and non-negative (active sampling reads raw counts).
        """
        idx = np.asarray(idx, dtype=np.int64)
        if self._counts is None:
            msg = "No expression in this sampling context (the table has no X or layer)."
            raise KeyError(msg)
        if idx.size and not self._known[idx].all():
            bad = idx[~self._known[idx]]
            msg = (f"A sampler read the expression of {bad.size} spot(s) it has not chosen (e.g. {int(bad[0])}); "
                   "reveal chosen spots with ctx.reveal(idx) first (simulate mode).")
            raise PermissionError(msg)
        rows = self._counts[idx]
        rows = rows.toarray() if sp.issparse(rows) else np.asarray(rows)
        rows = rows.astype(np.float32, copy=False)
        if rows.size:
            if not np.isfinite(rows).all():
                msg = (f"The expression of {int((~np.isfinite(rows).any(1)).sum())} measured spot(s) has NaN/inf "
                       "values; fill in the raw counts of every measured spot (or unmark it in sampled_key).")
                raise ValueError(msg)
            if (rows < 0).any():
                msg = ("The expression has negative values; active sampling reads raw counts (pass layer= naming "
                       "the raw-count layer).")
                raise ValueError(msg)
        return rows

    # ---------------------------------------------------------------- bookkeeping
    def record(self, **values: Any) -> None:
        """Append one per-round record (e.g. rewards) to ``.uns[key_added]['rounds']``."""
        self.records.append(dict(values))


@runtime_checkable
class Sampler(Protocol):
    """Chooses spots to sequence: ``select(ctx) -> indices`` (one array, or a list of arrays per round).

    The returned indices are ``ctx.budget`` distinct spots, none of them ``ctx.measured``.
    A sampler may define ``params() -> dict`` (recorded in ``.uns``).
    """

    def select(self, ctx: SamplingContext) -> np.ndarray | Sequence[np.ndarray]: ...


class FunctionSampler:
    """A plain function ``f(ctx, **options) -> indices`` as a :class:`Sampler`."""

    def __init__(self, func: Callable[..., Any], options: dict[str, Any] | None = None, name: str | None = None):
        self.func, self.options = func, dict(options or {})
        self.name = name or getattr(func, "__name__", "function")

    def select(self, ctx: SamplingContext):
        return self.func(ctx, **self.options)

    def params(self) -> dict[str, Any]:
        return {"function": self.name, **_jsonable(self.options)}

    def __repr__(self) -> str:
        return f"FunctionSampler({self.name})"


#: Registered samplers: name → a Sampler class (built with the method's options), a Sampler
#: object, or a function ``f(ctx, **options)``.
SAMPLERS: dict[str, Any] = {}


def register_sampler(name: str, sampler: Any = None, *, overwrite: bool = False):
    """Register a sampler under ``name`` for :func:`~stimg.tl.active_sample` and :func:`~stimg.tl.simulate_sampling`.

    Parameters
    ----------
    name
        Name passed as ``method=``.
    sampler
        A class whose instances have ``select(ctx)`` (built with the call's extra keyword
        arguments), a sampler object, or a function ``f(ctx, **options) -> indices``. Omitted:
        ``register_sampler`` works as a decorator.
    overwrite
        Replace an existing entry of the same name.

    Returns
    -------
    ``sampler`` (so it can decorate).

    Examples
    --------
    A sampler that takes the spots farthest from the tissue's centre, in three lines:

    >>> import numpy as np, stimg as si
    >>> def edge(ctx):
    ...     d = np.linalg.norm(ctx.coordinates - ctx.coordinates.mean(0), axis=1)
    ...     return ctx.free[np.argsort(-d[ctx.free])[: ctx.budget]]
    >>> _ = si.tl.register_sampler("edge", edge, overwrite=True)
    >>> adata = si.datasets.synthetic(100, 10, image=False, as_anndata=True)
    >>> si.tl.active_sample(adata, 10, method="edge")
    >>> int(adata.obs["si_sampled"].sum())
    10
    """
    if sampler is None:
        return lambda obj: register_sampler(name, obj, overwrite=overwrite)
    if not isinstance(name, str) or not name:
        msg = f"A sampler name must be a non-empty string, got {name!r}."
        raise ValueError(msg)
    if name in SAMPLERS and not overwrite:
        msg = f"Sampler {name!r} is already registered; pass overwrite=True to replace it."
        raise ValueError(msg)
    is_class = isinstance(sampler, type)
    if is_class and not callable(getattr(sampler, "select", None)):
        msg = f"Sampler class {sampler.__name__} has no select(ctx) method."
        raise TypeError(msg)
    if not is_class and not isinstance(sampler, Sampler) and not callable(sampler):
        msg = (f"A sampler must be a class with select(ctx), an object with select(ctx) or a function "
               f"f(ctx, **options); got {type(sampler).__name__}.")
        raise TypeError(msg)
    SAMPLERS[name] = sampler
    return sampler


def list_samplers() -> list[str]:
    """Names of the registered samplers.

    Examples
    --------
    >>> import stimg as si
    >>> "kmeans" in si.tl.list_samplers()
    True
    """
    return list(SAMPLERS)


def make_sampler(method: Any, options: dict[str, Any] | None = None) -> Any:
    """Build the sampler ``method`` (a registered name, a sampler object/class or a function) with ``options``."""
    options = dict(options or {})
    name = method
    if isinstance(method, str):
        if method not in SAMPLERS:
            msg = (f"Unknown sampling method {method!r}; registered: {list_samplers()}. Add your own with "
                   "si.tl.register_sampler(name, sampler).")
            raise ValueError(msg)
        method = SAMPLERS[method]
    if isinstance(method, type):
        _check_options(method, options, name)
        return method(**options)
    if isinstance(method, Sampler):
        if options:
            msg = (f"Options {sorted(options)} were given with a sampler object ({type(method).__name__}); set them "
                   "when building it instead.")
            raise TypeError(msg)
        return method
    if callable(method):
        _check_options(method, options, name, skip_first=True)
        return FunctionSampler(method, options, name if isinstance(name, str) else None)
    msg = f"method must be a sampler name, a Sampler or a function f(ctx), got {type(method).__name__}."
    raise TypeError(msg)


def _check_options(obj: Any, options: dict[str, Any], name: Any, *, skip_first: bool = False) -> None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature
        return
    params = list(sig.parameters.values())[1 if skip_first else 0:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    allowed = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if bad := sorted(set(options) - set(allowed)):
        label = name if isinstance(name, str) else getattr(obj, "__name__", type(obj).__name__)
        msg = f"Sampling method {label!r} has no option(s) {bad}; its options are {allowed}."
        raise TypeError(msg)


def sampler_params(sampler: Any) -> dict[str, Any]:
    """JSON-able parameters of a sampler (its ``params()``, else its public scalar attributes)."""
    if callable(getattr(sampler, "params", None)):
        return _jsonable(sampler.params())
    return _jsonable({k: v for k, v in vars(sampler).items() if not k.startswith("_") and not k.endswith("_")}
                     if hasattr(sampler, "__dict__") else {})


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif isinstance(v, (np.integer, np.floating, np.bool_)):
            out[k] = v.item()
        elif isinstance(v, dict) and all(isinstance(x, (int, float, str, bool)) for x in v.values()):
            out[k] = dict(v)
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float, str, bool)) for x in v):
            out[k] = list(v)
        else:
            out[k] = type(v).__name__
    return out
