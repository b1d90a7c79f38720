"""Image encoders: a registry of ImageNet CNNs, the offline EfficientNet-Lite0 and pathology foundation models.

Importing this package does not import torch; :func:`get_encoder` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._registry import ENCODERS, EncoderSpec, list_encoders, register_encoder

if TYPE_CHECKING:
    from ._build import Encoder, get_encoder

__all__ = ["ENCODERS", "Encoder", "EncoderSpec", "get_encoder", "list_encoders", "register_encoder"]


def __getattr__(name: str) -> Any:
    if name in ("Encoder", "get_encoder", "efficientnet_lite0_state_dict", "read_state_dict"):
        from . import _build

        return getattr(_build, name)
    msg = f"module 'stimg.encoders' has no attribute {name!r}"
    raise AttributeError(msg)
