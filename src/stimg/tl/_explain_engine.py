"""Patch → expression adapters and the explainers behind :func:`stimg.tl.explain` (imports torch).

Two adapters turn any stimg model into a function of image patches:

* :class:`FrozenFeaturePredictor` — for models that predict from features in ``.obsm`` (ridge,
  NB regressor and ensemble, SCR²Net, ...). The features are recomputed by the model's own
  encoder, rebuilt from the provenance :func:`stimg.pp.embed` recorded in
  ``.uns[embedding_key]['params']`` (or, for a table without the features, from the model's own
  ``embedding_provenance_``), and the model's ordinary ``predict`` runs on an AnnData that holds
  them. Nothing model-specific: a model only has to say which ``.obsm`` key it reads.
* :class:`TorchPredictor` — a differentiable ``patch → expression`` network, for gradient
  explainers and end-to-end models: the model's encoder (or the provenance encoder) followed by a
  torch head from :data:`TORCH_HEADS` (one builder per model class).

Explainers (:data:`EXPLAINERS`) take a predictor, a patch and its nucleus labels and return one
score per nucleus and gene.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .._utils import resolve_device


# ---------------------------------------------------------------------------------------------- patches
class PerturbedPatches(Dataset):
    """Copies of one patch with some nuclei replaced by a background colour.

    Item ``i`` keeps nucleus ``k`` (label ``k + 1``) where ``z[i, k] == 1`` and hides it otherwise;
    pixels outside nuclei are never changed. Items are uint8 ``(3, H, W)`` tensors built on the
    fly, a whole batch at a time (``__getitems__``), so nothing is stored per item.
    """

    def __init__(self, patch: np.ndarray, labels: np.ndarray, hide: np.ndarray, z: np.ndarray) -> None:
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.keep = torch.from_numpy(np.concatenate([np.ones((len(z), 1), bool), np.asarray(z, dtype=bool)], 1))
        self.base = torch.from_numpy(np.ascontiguousarray(np.moveaxis(patch, -1, 0)))
        self.hidden = hidden_patch(patch, labels, hide, as_tensor=True)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitems__(self, idx: list[int]) -> torch.Tensor:
        keep = self.keep[torch.as_tensor(idx)][:, self.labels]  # (B, H, W): one gather per batch
        return torch.where(keep[:, None], self.base[None], self.hidden[None])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.__getitems__([int(i)])[0]

    @staticmethod
    def collate(items) -> torch.Tensor:
        return items if isinstance(items, torch.Tensor) else torch.stack(list(items))


def hidden_patch(patch: np.ndarray, labels: np.ndarray, hide: np.ndarray, *, as_tensor: bool = False):
    """The patch with every nucleus replaced by ``hide`` (an RGB colour)."""
    out = np.where((labels > 0)[..., None], np.asarray(hide, np.uint8)[None, None], patch).astype(np.uint8)
    if as_tensor:
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(out, -1, 0)))
    return out


# ---------------------------------------------------------------------------------------------- predictors
@dataclass
class PatchSetup:
    """How the model's patches were cut: size in µm and px, stain normaliser."""

    patch_um: float
    patch_px: int
    stain: Any = None


class Predictor:
    """``predict(dataset of uint8 (3, H, W) patches) -> (n, n_genes)`` plus what it needs."""

    genes: list[str]
    setup: PatchSetup
    kind: str

    def predict(self, ds: Dataset) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def torch_forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A differentiable function of float ``(B, 3, H, W)`` patches in [0, 255] → ``(B, n_genes)``."""
        msg = (f"{self.kind} cannot be differentiated: use method='lime', or a model with a torch head "
               f"(registered in stimg.tl._explain_engine.TORCH_HEADS: {sorted(TORCH_HEADS)}).")
        raise TypeError(msg)

    def feature_check(self, row: int) -> float:
        """Cosine between the recomputed features of the unperturbed patch and the stored ones (NaN: not applicable).

        Reads the first item of the last :meth:`predict` call, which every explainer keeps unperturbed.
        """
        return float("nan")

    def close(self) -> None:
        """Release devices."""


def model_embedding_keys(model: Any) -> list[str] | None:
    """The ``.obsm`` keys a frozen-feature model reads, from what it records (``None``: unknown).

    Looked up, in order: ``embedding_provenance_`` (the model contract: a dict, or a list of them
    for ensembles), ``embedding_keys`` (ensembles), ``embedding_key_``, and the scvi-tools
    registry's ``embedding_key`` setup argument.
    """
    prov = getattr(model, "embedding_provenance_", None)
    if isinstance(prov, dict) and prov.get("embedding_key"):
        return [str(prov["embedding_key"])]
    if isinstance(prov, list | tuple) and prov and all(isinstance(p, dict) for p in prov):
        return list(dict.fromkeys(str(p["embedding_key"]) for p in prov))
    keys = getattr(model, "embedding_keys", None)
    if isinstance(keys, list | tuple) and keys:
        return list(dict.fromkeys(str(k) for k in keys))
    key = getattr(model, "embedding_key_", None)
    if isinstance(key, str):
        return [key]
    mgr = getattr(model, "adata_manager", None)
    args = getattr(mgr, "registry", {}).get("setup_args", {}) if mgr is not None else {}
    if isinstance(args.get("embedding_key"), str):
        return [args["embedding_key"]]
    return None


def model_provenance(model: Any, key: str) -> dict | None:
    """The embedding provenance a model (or an ensemble's members) recorded for ``key`` (the model contract)."""
    for m in [model, *getattr(model, "members", [])]:
        provs = getattr(m, "embedding_provenance_", None)
        for p in [provs] if isinstance(provs, dict) else list(provs or []):
            if isinstance(p, dict) and p.get("embedding_key") == key and p.get("encoder"):
                return dict(p)
    return None


def encoder_from_provenance(table, key: str, encoder: Any = None, *, stain: Any = None,
                            model_prov: dict | None = None):
    """(encoder, :class:`PatchSetup`, uns params) of the features ``.obsm[key]`` the model reads.

    The provenance comes from ``table.uns[key]['params']`` (written by :func:`stimg.pp.embed`) or,
    when the table does not hold the features, from the model's own record (``model_prov``), so a
    saved model explains a new slide without embedding it first. The encoder is rebuilt with
    :func:`stimg.encoders.get_encoder` from the recorded name, weights and ``pretrained`` flag, and
    its identity is checked against the recorded one; ``encoder`` (a name, module or
    :class:`~stimg.encoders.Encoder`) overrides it.
    """
    from ..models._base import embedding_provenance
    from ..pp._embed import _encoder_identity, _get_encoder

    params: dict = {}
    prov: dict = {}
    if key in table.obsm:
        prov = embedding_provenance(table, key)
        uns = table.uns.get(key)
        params = dict(uns.get("params", {}) or {}) if isinstance(uns, dict) else {}
    if not prov.get("encoder") and model_prov:
        prov = dict(model_prov)
        params = {k: prov.get(k) for k in ("encoder", "encoder_identity", "patch_um", "patch_px", "stain")}
    if key not in table.obsm and not prov and encoder is None:
        msg = (f"the model reads .obsm[{key!r}], which the table does not hold, and records no encoder to compute it; "
               "embed the data with si.pp.embed first, or pass encoder= and patch_um=.")
        raise KeyError(msg)
    if encoder is not None:
        from ..encoders import get_encoder

        enc = get_encoder(encoder)
    else:
        name = prov.get("encoder")
        if name is None:
            msg = (f"table.uns[{key!r}]['params'] does not record which encoder computed obsm[{key!r}] "
                   "(features from elsewhere); pass encoder= (the name, module or stimg.encoders.Encoder used) "
                   "and patch_um=/patch_px=.")
            raise KeyError(msg)
        weights, pretrained = params.get("weights"), bool(params.get("pretrained", True))
        name, ident = _encoder_identity(name, weights, pretrained, {})
        want = prov.get("encoder_identity")
        if want is not None and ident != want:
            msg = (f"obsm[{key!r}] was computed by a custom {prov['encoder']!r} encoder (a module, dict weights or "
                   "model_kwargs) that cannot be rebuilt from its name; pass encoder= the same encoder object.")
            raise ValueError(msg)
        enc = _get_encoder(name, weights, pretrained, {}, ident)
    patch_um = prov.get("patch_um")
    patch_px = prov.get("patch_px") or enc.input_px
    rec_stain = params.get("stain")
    if stain is None and rec_stain not in (None, "none"):
        msg = (f"obsm[{key!r}] was computed from stain-normalised patches ({rec_stain!r}); pass the same "
               "normaliser as stain= so the explained patches look like the ones the model saw.")
        raise ValueError(msg)
    return enc, PatchSetup(None if patch_um is None else float(patch_um), int(patch_px), stain), params


def _run(enc, ds: Dataset, batch_size: int, device, amp: bool | None) -> np.ndarray:
    from ..pp._embed import _amp_dtype, run_encoder

    return run_encoder(enc, ds, batch_size=batch_size, num_workers=0, device=device,
                       amp_dtype=_amp_dtype(device, amp), progress=False)


class FrozenFeaturePredictor(Predictor):
    """Encoder(s) from the embedding provenance, then the model's own ``predict`` on an AnnData.

    Works for any model with ``predict(adata) -> ExpressionPrediction`` that reads ``.obsm``
    features; multi-encoder ensembles get every key they read.
    """

    kind = "frozen-feature model"

    def __init__(self, model: Any, table, *, keys: Sequence[str], encoder: Any = None, stain: Any = None,
                 patch_um: float | None = None, patch_px: int | None = None, batch_size: int = 64,
                 accelerator: str | None = None, amp: bool | None = None,
                 predict_kwargs: dict | None = None) -> None:
        self.model, self.table, self.keys = model, table, list(keys)
        self.batch_size, self.amp = int(batch_size), amp
        self.device = resolve_device(accelerator)
        self.predict_kwargs = dict(predict_kwargs or {})
        self.encoders, self.params, setups = {}, {}, []
        for key in self.keys:
            enc, setup, params = encoder_from_provenance(table, key, encoder, stain=stain,
                                                         model_prov=model_provenance(model, key))
            self.encoders[key], self.params[key] = enc, params
            setups.append(setup)
        um = patch_um if patch_um is not None else setups[0].patch_um
        px = patch_px if patch_px is not None else setups[0].patch_px
        if um is None:
            msg = f"the patch size of obsm[{self.keys[0]!r}] is not recorded; pass patch_um= (and patch_px=)."
            raise KeyError(msg)
        if any((s.patch_um not in (None, um)) or s.patch_px != px for s in setups):
            msg = (f"the model reads features of patches of different sizes ({[(s.patch_um, s.patch_px) for s in setups]}); "
                   "explanations need one patch: explain one member or re-embed with one patch size.")
            raise ValueError(msg)
        self.setup = PatchSetup(float(um), int(px), stain)
        probe = {k: (np.asarray(table.obsm[k][:1], np.float32) if k in table.obsm
                     else np.zeros((1, self.encoders[k].dim), np.float32)) for k in self.keys}
        self.genes = list(self._predict_features(probe).var_names)

    def _predict_features(self, feats: dict[str, np.ndarray]):
        from anndata import AnnData

        from .._prediction import ExpressionPrediction

        n = len(next(iter(feats.values())))
        ad = AnnData(obs=pd.DataFrame(index=pd.RangeIndex(n).astype(str)))
        for k, f in feats.items():
            ad.obsm[k] = f
            ad.uns[k] = {"params": dict(self.params.get(k, {}))}
        pred = self.model.predict(ad, **self.predict_kwargs)
        if not isinstance(pred, ExpressionPrediction):
            msg = f"{type(self.model).__name__}.predict must return an ExpressionPrediction, got {type(pred).__name__}."
            raise TypeError(msg)
        return pred

    def _features(self, ds: Dataset) -> dict[str, np.ndarray]:
        out, done = {}, {}
        for k, enc in self.encoders.items():
            if id(enc) not in done:
                done[id(enc)] = _run(enc, ds, self.batch_size, self.device, self.amp)
            out[k] = done[id(enc)]
        return out

    def predict(self, ds: Dataset) -> np.ndarray:
        feats = self._features(ds)
        self.last_features = {k: f[:1] for k, f in feats.items()}
        return np.asarray(self._predict_features(feats).mean, dtype=np.float64)

    def feature_check(self, row: int) -> float:
        last = getattr(self, "last_features", None)
        if not last:
            return float("nan")
        cos = []
        for k, f in last.items():
            if k not in self.table.obsm:
                return float("nan")
            a, b = f[0].astype(np.float64), np.asarray(self.table.obsm[k][row], dtype=np.float64)
            cos.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)))
        return min(cos)

    def torch_forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        name = type(self.model).__name__
        if name not in TORCH_HEADS:
            return super().torch_forward()
        if len(set(map(id, self.encoders.values()))) != 1:
            msg = "gradient explanations of a multi-encoder ensemble are not supported; use method='lime'."
            raise ValueError(msg)
        enc = next(iter(self.encoders.values())).to(self.device).eval()
        th = TORCH_HEADS[name](self.model)
        head = th.head
        cols = [th.genes.index(g) for g in self.genes]

        def fwd(x: torch.Tensor) -> torch.Tensor:
            return head(enc(enc.preprocess(x)).float())[:, cols]

        return fwd

    def close(self) -> None:
        for enc in self.encoders.values():
            enc.cpu()


@dataclass
class TorchHead:
    """A differentiable head: ``head(features) -> (B, n_genes)`` log1p-scale expression.

    ``encoder`` (an :class:`~stimg.encoders.Encoder`) and ``setup`` are set for end-to-end models;
    frozen-feature models leave them ``None`` (the provenance encoder is used).
    """

    head: Callable[[torch.Tensor], torch.Tensor]
    genes: list[str]
    encoder: Any = None
    setup: PatchSetup | None = None
    modules: list[torch.nn.Module] = field(default_factory=list)


TORCH_HEADS: dict[str, Callable[[Any], TorchHead]] = {}


def register_torch_head(model_class: str, builder: Callable[[Any], TorchHead]) -> None:
    """Register how to build a :class:`TorchHead` for models of class ``model_class``."""
    TORCH_HEADS[model_class] = builder


def _nb_log1p_mean(r: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return torch.log1p(r * torch.exp(-logits))


def _nb_head(model) -> TorchHead:
    mod = model.module.eval()
    return TorchHead(lambda f: _nb_log1p_mean(**{k: v for k, v in mod.inference(f).items() if k in ("r", "logits")}),
                     list(model.genes_), modules=[mod])


def _nb_ensemble_head(model) -> TorchHead:
    mods = [m.module.eval() for m in model.members]

    def head(f):
        return torch.stack([_nb_log1p_mean(o["r"], o["logits"]) for o in (m.inference(f) for m in mods)]).mean(0)

    return TorchHead(head, list(model.genes_), modules=mods)


def _ridge_head(model) -> TorchHead:
    """The fitted standardise → PCA → ridge map is affine: read it off as ``x @ W + b``."""
    d = int(model.n_features_in_)
    b = model._predict_array(np.zeros((1, d)))
    W = model._predict_array(np.eye(d)) - b
    Wt, bt = torch.from_numpy(W.astype(np.float32)), torch.from_numpy(b[0].astype(np.float32))
    return TorchHead(lambda f: f @ Wt.to(f.device) + bt.to(f.device), list(model.var_names_))


def _finetuner_head(model) -> TorchHead:
    net = model.net.eval()
    p = model.init_params_

    def head(f):
        r, b = net.nb_params(f)
        return _nb_log1p_mean(r, b)

    return TorchHead(head, list(model.genes_), encoder=net.encoder,
                     setup=PatchSetup(float(p["patch_um"]), int(p["patch_px"])), modules=[net])


for _name, _builder in (("NBRegressor", _nb_head), ("NBEnsemble", _nb_ensemble_head),
                        ("RidgeRegressor", _ridge_head), ("NBFinetuner", _finetuner_head)):
    register_torch_head(_name, _builder)


class TorchPredictor(Predictor):
    """An end-to-end model (its own encoder and torch head), batched without gradients for LIME."""

    kind = "end-to-end model"

    def __init__(self, model: Any, *, batch_size: int = 64, accelerator: str | None = None,
                 stain: Any = None) -> None:
        name = type(model).__name__
        th = TORCH_HEADS[name](model)
        if th.encoder is None or th.setup is None:
            msg = f"{name} has no encoder of its own; it is explained through its embedding provenance."
            raise TypeError(msg)
        self.th, self.model = th, model
        self.enc = th.encoder
        self.genes = list(th.genes)
        self.setup = PatchSetup(th.setup.patch_um, th.setup.patch_px, stain)
        self.batch_size = int(batch_size)
        self.device = resolve_device(accelerator)

    def torch_forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        enc, head = self.enc.to(self.device).eval(), self.th.head
        for m in self.th.modules:
            m.to(self.device).eval()

        def fwd(x: torch.Tensor) -> torch.Tensor:
            return head(enc(enc.preprocess(x)).float())

        return fwd

    @torch.inference_mode()
    def predict(self, ds: Dataset) -> np.ndarray:
        from torch.utils.data import DataLoader

        fwd = self.torch_forward()
        out = [fwd(xb.to(self.device).float()).double().cpu()
               for xb in DataLoader(ds, batch_size=self.batch_size, collate_fn=getattr(ds, "collate", None))]
        return torch.cat(out).numpy()

    def close(self) -> None:
        for m in [self.enc, *self.th.modules]:
            m.cpu()


def build_predictor(model: Any, table, *, embedding_key: str | Sequence[str] | None = None, encoder: Any = None,
                    stain: Any = None, patch_um: float | None = None, patch_px: int | None = None,
                    batch_size: int = 64, accelerator: str | None = None, amp: bool | None = None,
                    predict_kwargs: dict | None = None) -> Predictor:
    """The patch → expression adapter of ``model``.

    End-to-end models (``needs_images``) run their own network; all others are frozen-feature
    models, explained through the encoder of their embedding provenance.
    """
    if not hasattr(model, "predict"):
        msg = f"{type(model).__name__} has no predict method; pass a trained stimg model."
        raise TypeError(msg)
    if getattr(model, "is_trained_", True) is False:
        msg = f"{type(model).__name__} is not trained; train it before explaining its predictions."
        raise RuntimeError(msg)
    if getattr(model, "needs_images", False) is True:
        if type(model).__name__ not in TORCH_HEADS:
            msg = (f"{type(model).__name__} reads images itself but has no torch head registered in "
                   "stimg.tl._explain_engine.TORCH_HEADS; register one with register_torch_head.")
            raise TypeError(msg)
        return TorchPredictor(model, batch_size=batch_size, accelerator=accelerator, stain=stain)
    keys = [embedding_key] if isinstance(embedding_key, str) else (list(embedding_key) if embedding_key else None)
    keys = keys or model_embedding_keys(model)
    if not keys:
        msg = (f"cannot tell which .obsm features {type(model).__name__} reads; pass embedding_key= "
               "(e.g. 'X_efficientnet_lite0').")
        raise KeyError(msg)
    return FrozenFeaturePredictor(model, table, keys=keys, encoder=encoder, stain=stain, patch_um=patch_um,
                                  patch_px=patch_px, batch_size=batch_size, accelerator=accelerator, amp=amp,
                                  predict_kwargs=predict_kwargs)


# ---------------------------------------------------------------------------------------------- explainers
@dataclass
class SpotExplanation:
    """What an explainer returns for one patch.

    ``scores`` ``(n_nuclei, n_genes)``; ``prediction`` (the unperturbed patch), ``intercept`` and
    ``fit`` (LIME: weighted R² of the local model; integrated gradients: completeness error)
    ``(n_genes,)``; ``pixel_map`` ``(n_genes, H, W)`` for gradient methods.
    """

    scores: np.ndarray
    prediction: np.ndarray
    intercept: np.ndarray
    fit: np.ndarray
    pixel_map: np.ndarray | None = None


def lime(pred: Predictor, patch: np.ndarray, labels: np.ndarray, hide: np.ndarray, cols: list[int], *,
         n_samples: int = 1000, kernel_width: float = 0.25, seed: int = 0, **_: Any) -> SpotExplanation:
    """LIME (``lime.lime_image``) with nuclei as the interpretable features.

    Each of ``n_samples`` perturbations keeps a random half of the nuclei (the first keeps all) and
    replaces the others by the background colour; the perturbed patches go through the predictor
    in batches. ``lime``'s own :class:`~lime.lime_image.LimeImageExplainer` supplies the random
    draws, the cosine-distance kernel and the weighted ridge fit, per gene. Pixels outside nuclei
    are never perturbed (they are not features).
    """
    import sklearn.metrics
    from lime import lime_image

    k = int(labels.max())
    explainer = lime_image.LimeImageExplainer(kernel_width=kernel_width, feature_selection="none", random_state=seed)
    z = explainer.random_state.randint(0, 2, n_samples * k).reshape(n_samples, k)
    z[0, :] = 1
    y = pred.predict(PerturbedPatches(patch, labels, hide, z))[:, cols]
    dist = sklearn.metrics.pairwise_distances(z, z[:1], metric="cosine").ravel()
    g = len(cols)
    scores, intercept, fit = np.zeros((k, g)), np.zeros(g), np.zeros(g)
    for j in range(g):
        icpt, weights, r2, _ = explainer.base.explain_instance_with_data(z, y, dist, j, k, feature_selection="none")
        for f, w in weights:
            scores[int(f), j] = w
        intercept[j], fit[j] = float(icpt), float(r2)
    return SpotExplanation(scores, y[0].copy(), intercept, fit)


def _gradient(kind: str):
    def explain(pred: Predictor, patch: np.ndarray, labels: np.ndarray, hide: np.ndarray, cols: list[int], *,
                n_steps: int = 32, batch_size: int = 16, **_: Any) -> SpotExplanation:
        from captum.attr import IntegratedGradients, Saliency

        fwd = pred.torch_forward()
        dev = getattr(pred, "device", torch.device("cpu"))
        x = torch.from_numpy(np.moveaxis(patch, -1, 0).copy()).float()[None].to(dev)
        base = hidden_patch(patch, labels, hide, as_tensor=True).float()[None].to(dev)
        flat = torch.from_numpy(labels.ravel().astype(np.int64))
        k, g = int(labels.max()), len(cols)
        scores, inter, fit = np.zeros((k, g)), np.zeros(g), np.full(g, np.nan)
        pix = np.zeros((g, *labels.shape), np.float32)
        with torch.no_grad():
            y0, yb = fwd(x)[0, cols].double().cpu().numpy(), fwd(base)[0, cols].double().cpu().numpy()
        for j, c in enumerate(cols):
            if kind == "saliency":
                grad = Saliency(fwd).attribute(x.clone().requires_grad_(True), target=int(c), abs=False)
                contrib = (grad * (x - base)).sum(1)[0]  # first-order effect of hiding each pixel's nucleus
                pix[j] = grad.abs().amax(1)[0].detach().cpu().numpy()
                inter[j] = y0[j] - float(contrib.sum())
            else:
                attr, delta = IntegratedGradients(fwd).attribute(
                    x, baselines=base, target=int(c), n_steps=n_steps, internal_batch_size=batch_size,
                    return_convergence_delta=True)
                contrib = attr.sum(1)[0]
                pix[j] = contrib.detach().cpu().numpy()
                inter[j], fit[j] = yb[j], float(delta.abs().sum())
            per = torch.bincount(flat, weights=contrib.detach().cpu().double().ravel(), minlength=k + 1)
            scores[:, j] = per[1:].numpy()
        return SpotExplanation(scores, y0, inter, fit, pix)

    explain.__name__ = kind
    return explain


EXPLAINERS: dict[str, Callable[..., SpotExplanation]] = {
    "lime": lime,
    "saliency": _gradient("saliency"),
    "integrated_gradients": _gradient("integrated_gradients"),
}


# ---------------------------------------------------------------------------------------------- faithfulness
def equal_area_draw(areas: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """Random nuclei whose total area is as close as possible to ``target`` (indices into ``areas``)."""
    order = rng.permutation(len(areas))
    cum = np.cumsum(areas[order])
    n = int(np.searchsorted(cum, target))  # first prefix reaching the target
    if n >= len(order):
        return order
    if n > 0 and abs(cum[n - 1] - target) <= abs(cum[n] - target):
        return order[:n]
    return order[: n + 1]


def deletion_check(pred: Predictor, patch: np.ndarray, labels: np.ndarray, hide: np.ndarray, cols: list[int],
                   scores: np.ndarray, *, top: float = 0.1, n_random: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """How much hiding the top-scored nuclei, or random nuclei of equal total area, lowers the prediction.

    For each gene: ``drop_top`` = prediction − prediction with the ``top`` fraction (at least one)
    of nuclei with the highest scores hidden; ``drop_random`` = the same, averaged over
    ``n_random`` draws of random nuclei of (as nearly as possible) the same total area;
    ``change_top`` and ``change_random`` are the absolute changes. Returns arrays of ``(n_genes,)``.
    """
    k, g = scores.shape
    areas = np.bincount(labels.ravel(), minlength=k + 1)[1:].astype(float)
    n_top = max(1, int(round(top * k)))
    rng = np.random.default_rng(seed)
    rows = [np.ones(k, bool)]
    for j in range(g):
        best = np.argsort(-scores[:, j], kind="stable")[:n_top]
        z = np.ones(k, bool)
        z[best] = False
        rows.append(z)
        for _ in range(n_random):
            z = np.ones(k, bool)
            z[equal_area_draw(areas, areas[best].sum(), rng)] = False
            rows.append(z)
    y = pred.predict(PerturbedPatches(patch, labels, hide, np.stack(rows)))[:, cols]
    y0, rest = y[0], y[1:].reshape(g, 1 + n_random, g)
    idx = np.arange(g)
    top_y = rest[idx, 0, idx]
    rnd_y = rest[idx, 1:, idx]  # (g, n_random)
    return {"drop_top": y0 - top_y, "drop_random": (y0[:, None] - rnd_y).mean(1),
            "change_top": np.abs(y0 - top_y), "change_random": np.abs(y0[:, None] - rnd_y).mean(1)}
