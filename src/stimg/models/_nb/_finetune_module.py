"""Module layer of :class:`NBFinetuner`: a trainable image encoder followed by the NB head of :class:`NBModule`."""

from __future__ import annotations

import torch
from torch import nn

from ._module import NBModule, nb_log_prob


class FinetuneModule(nn.Module):
    """Encoder (uint8 patches → features) followed by the NB head of :class:`NBModule`.

    Parameters
    ----------
    encoder
        A :class:`stimg.encoders.Encoder` (uint8 input, ``(B, dim)`` output).
    head
        The NB head (standardises the features, then ``r = softplus(·)``, ``p = sigmoid(·)``).
    """

    def __init__(self, encoder: nn.Module, head: NBModule):
        super().__init__()
        self.encoder, self.head = encoder, head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features in float32 (mixed precision on CUDA unless autocast is already on)."""
        if x.device.type == "cuda" and not torch.is_autocast_enabled():
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                return self.encoder(x).float()
        return self.encoder(x).float()

    def nb_params(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NB ``r`` and success logits from features (NB maths in float32)."""
        with torch.autocast(feats.device.type, enabled=False):
            o = self.head.inference(feats.float())
        return o["r"], o["logits"]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, logits)`` of a uint8 patch batch."""
        return self.nb_params(self.features(x))

    @staticmethod
    def loss(r: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-spot NB negative log-likelihood summed over genes."""
        return -nb_log_prob(y.float(), r, logits).sum(-1)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random element of the dihedral group (flips and 90° rotations) per square patch, on ``x``'s device."""
    b = x.shape[0]
    f = torch.randint(0, 2, (3, b, 1, 1, 1), device=x.device, dtype=torch.bool)
    x = torch.where(f[0], x.flip(-1), x)
    x = torch.where(f[1], x.flip(-2), x)
    return torch.where(f[2], x.transpose(-1, -2), x)
