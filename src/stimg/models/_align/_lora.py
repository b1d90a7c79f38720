"""LoRA fine-tuning of a ViT image encoder for the aligner's image tower (peft; HESCAPE's "unlocked" image side)."""

from __future__ import annotations

from typing import Any

from torch import nn

#: HESCAPE fine-tunes the self-attention query-key-value and output projections with LoRA.
DEFAULT_TARGETS = r".*attn\.(qkv|proj)"


def lora_encoder(encoder: str | nn.Module, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: str | list[str] = DEFAULT_TARGETS, pretrained: bool = True,
                 input_px: int | None = None, **encoder_kwargs: Any):
    """A :class:`stimg.encoders.Encoder` whose network carries LoRA adapters (only they train).

    Parameters
    ----------
    encoder
        Encoder name (registry or timm ViT architecture) or a module.
    rank, alpha, dropout
        LoRA rank, scaling ``alpha`` and dropout (:class:`peft.LoraConfig`).
    target_modules
        Modules that get adapters: a regex over module names (default: ``attn.qkv`` and
        ``attn.proj`` of every block), or a list of name suffixes.
    pretrained
        Start from the encoder's pretrained weights.
    input_px
        Network input side (``None``: the encoder's).
    **encoder_kwargs
        Passed to :func:`stimg.encoders.get_encoder` (e.g. ``depth=2`` for a small test copy).

    Returns
    -------
    The encoder, in eval mode, base weights frozen.
    """
    from peft import LoraConfig, get_peft_model

    from ...encoders import get_encoder

    enc = get_encoder(encoder, pretrained=pretrained, **encoder_kwargs)
    if input_px is not None:
        enc.input_px, enc.resize_px, enc._dim = int(input_px), None, None
    dim = enc.dim  # dry run before wrapping
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                     target_modules=target_modules, bias="none")
    try:
        enc.net = get_peft_model(enc.net, cfg)
    except ValueError as e:
        names = [n for n, m in enc.net.named_modules() if isinstance(m, nn.Linear)][:6]
        msg = (f"LoRA found no module matching target_modules={target_modules!r} in {enc.name!r} ({e}); its linear "
               f"layers are named e.g. {names}. Pass lora_targets= accordingly (LoRA here is meant for ViTs).")
        raise ValueError(msg) from None
    enc._dim = dim
    return enc.eval()
