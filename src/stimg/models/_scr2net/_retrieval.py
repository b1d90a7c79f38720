"""Retrieval of SCR²Net (SCR²-ST §2.3.1): top-K by cosine, majority cell-type filter, soft labels, confidence.

Pure tensor functions, shared by training (soft labels for knowledge distillation) and inference
(retrieval-based prediction), so both use exactly the same rule.
"""

from __future__ import annotations

import torch


def top_k(query: torch.Tensor, keys: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and bank positions of the ``k`` most similar keys per query.

    Parameters
    ----------
    query
        ``(B, d)`` L2-normalised query embeddings.
    keys
        ``(N, d)`` L2-normalised memory-bank embeddings.
    k
        Neighbours per query (capped by the bank size, minus one with ``exclude``).
    exclude
        ``(B,)`` bank position to leave out per query (a training spot must not retrieve itself);
        negative entries exclude nothing.

    Returns
    -------
    ``(sims, idx)``, each ``(B, k)``, most similar first.
    """
    sims = query @ keys.T
    n = keys.shape[0]
    if exclude is not None:
        ex = exclude.to(sims.device).long()
        rows = torch.nonzero(ex >= 0).squeeze(1)
        sims = sims.clone()
        sims[rows, ex[rows]] = float("-inf")
        n -= 1
    k = max(1, min(int(k), n))
    return sims.topk(k, dim=1)


def majority_type_mask(types: torch.Tensor, n_types: int | None) -> torch.Tensor:
    """Keep the retrieved spots of the ``n_types`` most frequent cell types among them.

    Parameters
    ----------
    types
        ``(B, K)`` integer cell type of each retrieved spot, most similar first. Negative codes
        (unknown type) are never kept unless no spot has a known type.
    n_types
        ``T``; ``None`` keeps every retrieved spot (no filter).

    Returns
    -------
    ``(B, K)`` boolean mask. Types are ranked by their count among the ``K`` spots; ties go to the
    type whose first spot is the more similar one, so the result is deterministic.
    """
    if n_types is None:
        return torch.ones_like(types, dtype=torch.bool)
    b, k = types.shape
    known = types >= 0
    t = types.clamp_min(0)
    n_classes = int(t.max()) + 1 if t.numel() else 1
    onehot = torch.nn.functional.one_hot(t, n_classes) * known.unsqueeze(-1)  # (B, K, C)
    counts = onehot.sum(1)  # (B, C)
    pos = torch.arange(k, device=types.device).view(1, k, 1).expand_as(onehot)
    first = torch.where(onehot.bool(), pos, torch.full_like(pos, k)).amin(1)  # (B, C)
    score = counts * (k + 1) - first  # more spots first, then the earlier (more similar) first spot
    score = torch.where(counts > 0, score, torch.full_like(score, -1))
    n_keep = min(int(n_types), n_classes)
    top = score.topk(n_keep, dim=1).indices  # (B, T)
    chosen = torch.zeros(b, n_classes, dtype=torch.bool, device=types.device)
    chosen.scatter_(1, top, True)
    chosen &= counts > 0
    keep = torch.gather(chosen, 1, t) & known
    none = ~keep.any(1)
    if none.any():  # no known type among the K: keep all of them
        keep[none] = True
    return keep


def soft_labels(values: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of the kept retrieved profiles: ``(N, G)`` bank values, ``(B, K)`` positions and mask → ``(B, G)``."""
    w = keep.to(values.dtype)
    w = w / w.sum(1, keepdim=True).clamp_min(1.0)
    return torch.einsum("bk,bkg->bg", w, values[idx])


def confidence_mask(sims: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(B,)`` weight of the distillation loss: 1 where the mean top-K cosine similarity exceeds ``threshold``.

    As in the SCR²-ST implementation the mean is over all ``K`` retrieved spots (before the cell
    type filter) and the mask is binary.
    """
    return (sims.mean(1) > threshold).to(sims.dtype)


def retrieve(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, types: torch.Tensor | None, *,
             k: int, n_types: int | None, threshold: float, exclude: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft label ``(B, G)`` and confidence ``(B,)`` for normalised queries against a memory bank.

    ``types=None`` (no cell types) skips the majority filter.
    """
    sims, idx = top_k(query, keys, k, exclude=exclude)
    keep = majority_type_mask(types[idx], n_types) if types is not None else torch.ones_like(idx, dtype=torch.bool)
    return soft_labels(values, idx, keep), confidence_mask(sims, threshold)
