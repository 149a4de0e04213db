"""NoPeek: a Bottom trained so its output tells less about its input.

Vepakomma et al. (2020) add the distance correlation between a split model's input and the
activations it sends to the training loss. Here the input is the token embeddings the Bottom
starts from and the activations are the hidden states the trunk receives, over the real
(unpadded) positions of a micro-batch. Minimising it pushes the Bottom's LoRA away from the
public Bottom's output, which the trunk owner's inversion attacks rely on. The Bottom's LoRA
is small, so how far it can move is limited: the audit measures what it buys.
"""

from __future__ import annotations

import torch

# Distance correlation is O(positions²) in memory; longer batches use an evenly spread subset.
MAX_POSITIONS = 512


def _centred_distances(values: torch.Tensor) -> torch.Tensor:
    """Double-centred pairwise Euclidean distances of (n, dim) rows."""
    squared = (values.unsqueeze(0) - values.unsqueeze(1)).pow(2).sum(-1)  # (n, n)
    distances = torch.sqrt(squared + 1e-12)  # finite gradient at distance 0 (the diagonal)
    return distances - distances.mean(0, keepdim=True) - distances.mean(1, keepdim=True) + distances.mean()


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation in [0, 1] between rows of ``x`` (n, dx) and ``y`` (n, dy)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"distance correlation needs paired rows, got {x.shape[0]} and {y.shape[0]}")
    a, b = _centred_distances(x.float()), _centred_distances(y.float())
    covariance = (a * b).mean().clamp_min(0)
    scale = torch.sqrt((a * a).mean() * (b * b).mean()).clamp_min(1e-12)
    return torch.sqrt(covariance / scale)


def nopeek_penalty(embeddings: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Distance correlation between the Bottom's input ``embeddings`` and output ``hidden``
    (both (batch, seq, hidden)) over the real positions of ``attention_mask`` (batch, seq)."""
    real = attention_mask.bool()
    x, y = embeddings[real], hidden[real]  # (positions, hidden)
    if x.shape[0] > MAX_POSITIONS:
        keep = torch.linspace(0, x.shape[0] - 1, MAX_POSITIONS).round().long()
        x, y = x[keep], y[keep]
    if x.shape[0] < 2:
        return hidden.sum() * 0.0
    return distance_correlation(x.detach(), y)
