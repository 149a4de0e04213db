"""An attack on a private Bottom that aligns the received hidden states to the public Bottom's.

The linear map and the candidate search of ``attacks`` assume the client runs the public
Bottom. A private Bottom (``private_bottom``) breaks that assumption, but the trunk owner
receives many of the private Bottom's hidden states and can fit its own map on them, without
their tokens. ``aligned_inversion`` plays that attacker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitcore.model.parts import Bottom
from splitcore.privacy import attacks


@dataclass(frozen=True)
class AlignmentConfig:
    """Knobs of the alignment attack. ``seed``: the attacker's own random draws."""

    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"the alignment attack's seed must be a whole number from 0 to 2**63 - 1, "
                             f"got {self.seed!r}")


def _moment_matched(received: torch.Tensor, public_hidden: torch.Tensor) -> torch.Tensor:
    """``received`` (n, hidden) shifted and scaled per coordinate to the public states' mean and spread."""
    mean, spread = received.mean(0), received.std(0).clamp_min(1e-6)
    return (received - mean) / spread * public_hidden.std(0) + public_hidden.mean(0)  # (n, hidden)


@torch.no_grad()
def aligned_inversion(public_bottom: Bottom, received: torch.Tensor, attention_mask: torch.Tensor,
                      public_hidden: torch.Tensor, public_ids: torch.Tensor, embeddings: torch.Tensor,
                      inversion: attacks.InversionMap, k: int,
                      config: AlignmentConfig = AlignmentConfig()) -> attacks.TokenGuesses:
    """Read ``received`` (batch, seq, hidden) after aligning it to the public Bottom's output space."""
    real = attention_mask.bool()
    aligned = _moment_matched(received[real].float(), public_hidden.float())  # (n, hidden)
    ranked = attacks.nearest_tokens(inversion.predict(aligned), embeddings, k)  # (n, k)
    candidates = torch.zeros(*received.shape[:2], ranked.shape[1], dtype=torch.long, device=received.device)
    candidates[real] = ranked
    return attacks.TokenGuesses(tokens=candidates[..., 0], candidates=candidates)
