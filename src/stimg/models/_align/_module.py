"""Two projection towers and a contrastive loss as an scvi-tools module (HESCAPE, DESIGN §4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from .._base import FEATURE_SCALES, check_standardize
from .._contrastive import ProjectionHead, l2_normalize, make_loss
from ._constants import ALIGN_KEYS


def _buffer(x: np.ndarray | None, n: int, fill: float) -> torch.Tensor:
    return torch.full((n,), fill) if x is None else torch.as_tensor(np.asarray(x), dtype=torch.float32).reshape(n)


class AlignModule(BaseModuleClass):
    """Image tower and expression tower into one L2-normalised space, trained with a contrastive loss.

    Each tower standardises its input (training mean and sd, saved as buffers) and applies a
    :class:`~stimg.models._contrastive.ProjectionHead`; the loss (``'clip'`` or ``'siglip'``,
    from :data:`~stimg.models._contrastive.LOSSES`) owns the learnable, clamped temperature.

    Parameters
    ----------
    n_image
        Image-feature width.
    n_gene
        Expression-input width (genes, or the size of a frozen latent).
    n_latent
        Shared embedding dimension.
    image_hidden, gene_hidden
        Hidden widths of the towers (``None``: 2 × input).
    dropout
        Dropout inside both towers.
    loss
        Registered contrastive loss name.
    loss_kwargs
        Passed to the loss (temperature init and clamp, ``learnable``).
    image_mean, image_std, gene_mean, gene_std
        Input standardisation.
    standardize
        How :meth:`set_standardization` scales the centred image features: ``'per_feature'``
        (z-scores) or ``'isotropic'`` (one scale, the mean per-feature SD). Expression inputs are
        always z-scored.
    """

    def __init__(self, n_image: int, n_gene: int, *, n_latent: int = 128, image_hidden: int | None = 256,
                 gene_hidden: int | None = None, dropout: float = 0.5, loss: str = "clip",
                 loss_kwargs: dict[str, Any] | None = None, image_mean: np.ndarray | None = None,
                 image_std: np.ndarray | None = None, gene_mean: np.ndarray | None = None,
                 gene_std: np.ndarray | None = None, image_encoder: nn.Module | None = None,
                 standardize: str = "per_feature") -> None:
        super().__init__()
        self.standardize = check_standardize(standardize)
        #: optional trainable image encoder (LoRA ViT): the image input is then spot rows, whose
        #: uint8 patches come from ``patch_source(rows)`` (set by the model; not saved).
        self.image_encoder = image_encoder
        self.patch_source: Callable[[np.ndarray], torch.Tensor] | None = None
        self.image_head = ProjectionHead(n_image, n_latent, n_hidden=image_hidden, dropout=dropout)
        self.gene_head = ProjectionHead(n_gene, n_latent, n_hidden=gene_hidden, dropout=dropout)
        self.contrastive = make_loss(loss, **(loss_kwargs or {}))
        self.register_buffer("image_mean", _buffer(image_mean, n_image, 0.0))
        self.register_buffer("image_std", _buffer(image_std, n_image, 1.0).clamp_min(1e-6))
        self.register_buffer("gene_mean", _buffer(gene_mean, n_gene, 0.0))
        self.register_buffer("gene_std", _buffer(gene_std, n_gene, 1.0).clamp_min(1e-6))

    @torch.no_grad()
    def set_standardization(self, image: np.ndarray, gene: np.ndarray) -> None:
        """Centre the inputs on these (training) rows; scale image features by ``standardize``, genes by their sd."""
        for name, x, scale in (("image", image, FEATURE_SCALES[self.standardize]), ("gene", gene, FEATURE_SCALES["per_feature"])):
            x = np.asarray(x, dtype=np.float64)
            getattr(self, f"{name}_mean").copy_(torch.from_numpy(x.mean(0)))
            getattr(self, f"{name}_std").copy_(torch.from_numpy(np.asarray(scale(x))).clamp_min(1e-6))

    # ------------------------------------------------------------------ towers
    def encode_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a uint8 patch batch from the trainable encoder (mixed precision on CUDA; flips when training)."""
        if self.training:
            from .._nb._finetune_module import augment

            x = augment(x)
        if x.device.type == "cuda" and not torch.is_autocast_enabled():
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                return self.image_encoder(x).float()
        return self.image_encoder(x).float()

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image features: ``x`` itself (frozen features), or the encoder's features of the patches of rows ``x``."""
        if self.image_encoder is None:
            return x.float()
        if self.patch_source is None:
            msg = "this aligner fine-tunes an image encoder: give it patches (the model sets patch_source)."
            raise RuntimeError(msg)
        rows = x.reshape(-1).long().cpu().numpy()
        return self.encode_patches(self.patch_source(rows).to(self.image_mean.device, non_blocking=True))

    def project_image(self, feats: torch.Tensor) -> torch.Tensor:
        """Unit-norm joint embedding of image features ``(n, n_image)``."""
        return l2_normalize(self.image_head((feats.float() - self.image_mean) / self.image_std))

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm joint embedding of image features (or of the patches of rows ``x`` with an encoder)."""
        return self.project_image(self.image_features(x))

    def embed_gene(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm joint embedding of expression inputs ``(n, n_gene)``."""
        return l2_normalize(self.gene_head((x.float() - self.gene_mean) / self.gene_std))

    # ------------------------------------------------------------------ scvi-tools interface
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        return {"image": tensors[ALIGN_KEYS.IMAGE], "gene": tensors.get(ALIGN_KEYS.GENE)}

    def _get_generative_input(self, tensors, inference_outputs) -> dict:
        return {}

    @auto_move_data
    def inference(self, image: torch.Tensor | None = None, gene: torch.Tensor | None = None
                  ) -> dict[str, torch.Tensor | None]:
        """Joint embeddings ``z_image`` and ``z_gene`` (``None`` for a missing input)."""
        return {"z_image": None if image is None else self.embed_image(image),
                "z_gene": None if gene is None else self.embed_gene(gene)}

    def generative(self) -> dict:
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        """Contrastive loss of the minibatch's (image, expression) pairs; per-pair terms as ``reconstruction_loss``."""
        zi, zg = inference_outputs["z_image"], inference_outputs["z_gene"]
        temp = torch.tensor(self.contrastive.temperature)
        if zi.shape[0] < 2:  # a lone last validation pair has no negatives
            per = (zi * zg).sum(-1) * 0.0
        else:
            per = self.contrastive(zi, zg, reduction="none")
        return LossOutput(loss=per.mean(), reconstruction_loss=per, extra_metrics={"temperature": temp})

    def sample(self, *args, **kwargs):
        msg = "ContrastiveAligner does not generate data; use get_latent_representation or predict."
        raise NotImplementedError(msg)
