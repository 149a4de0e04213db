"""Clipped Gaussian noise on the two channels the trunk sees: hidden states and gradients.

Each position's vector is clipped to ``CLIP_MULTIPLE`` times the median norm of the
micro-batch's real positions (the multiple spares the few positions that carry very large
activations, which the model needs), then Gaussian noise is added whose expected norm is
``scale`` times that median. The noise comes from a generator seeded with the client's
secret, the step and the micro-batch: a resumed run draws the same noise, and the trunk
cannot draw it.

Each kind of traffic draws under its own purpose: training's hidden states and gradients per
(step, micro-batch), a validation batch's hidden states per (evaluation step, batch), and a
generation's hidden states per decoding position (with a key that mixes in a fresh nonce per
request, so no two prompts share a draw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from splitcore.privacy.client_secret import (
    EVAL_HIDDEN_NOISE,
    GENERATION_HIDDEN_NOISE,
    GRAD_NOISE,
    HIDDEN_NOISE,
    ClientSecret,
)

CLIP_MULTIPLE = 4.0


def clip_and_noise(values: torch.Tensor, attention_mask: torch.Tensor, scale: float,
                   generator: torch.Generator) -> torch.Tensor:
    """``values`` (batch, seq, hidden) clipped per position and blurred; differentiable in ``values``."""
    if scale <= 0:
        return values
    norms = values.detach().float().norm(dim=-1, keepdim=True)  # (batch, seq, 1)
    real = attention_mask.bool()
    typical = norms[real].median() if real.any() else norms.median()
    if not torch.isfinite(typical) or typical <= 0:
        return values
    bound = CLIP_MULTIPLE * typical
    factor = torch.clamp(bound / norms.clamp_min(1e-12), max=1.0).to(values.dtype)  # (batch, seq, 1)
    per_coordinate = float(scale * typical / math.sqrt(values.shape[-1]))
    noise = torch.randn(values.shape, generator=generator, dtype=torch.float32) * per_coordinate
    return values * factor + noise.to(values.device, values.dtype)


class _NoisyGradient(torch.autograd.Function):
    """Identity forward; backward clips and blurs the gradient before it flows on (to the trunk)."""

    @staticmethod
    def forward(ctx, hidden, attention_mask, scale, generator):
        ctx.save_for_backward(attention_mask)
        ctx.scale, ctx.generator = scale, generator
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_output):
        (attention_mask,) = ctx.saved_tensors
        return clip_and_noise(grad_output, attention_mask, ctx.scale, ctx.generator), None, None, None


@dataclass(frozen=True)
class ChannelNoise:
    """The noise of one run on both channels, drawn per (step, micro-batch) from the client's secret."""

    secret: ClientSecret
    seed: int
    hidden_scale: float = 0.0
    grad_scale: float = 0.0

    def _generator(self, purpose: str, *values: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.secret.derive(purpose, self.seed, *values))

    def on_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor, step: int,
                  micro_batch: int) -> torch.Tensor:
        """What the trunk receives instead of ``hidden`` (batch, seq, hidden)."""
        if self.hidden_scale <= 0:
            return hidden
        return clip_and_noise(hidden, attention_mask, self.hidden_scale,
                              self._generator(HIDDEN_NOISE, step, micro_batch))

    def on_gradient(self, hidden: torch.Tensor, attention_mask: torch.Tensor, step: int,
                    micro_batch: int) -> torch.Tensor:
        """Identity on ``hidden``; the gradient that flows back through it is clipped and blurred."""
        if self.grad_scale <= 0:
            return hidden
        return _NoisyGradient.apply(hidden, attention_mask, self.grad_scale,
                                    self._generator(GRAD_NOISE, step, micro_batch))

    def on_eval_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor, step: int,
                       batch: int) -> torch.Tensor:
        """What the trunk receives instead of the ``batch``-th validation batch's ``hidden`` (batch, seq, hidden)
        in the evaluation after training step ``step``: a draw of its own, never a training step's."""
        if self.hidden_scale <= 0:
            return hidden
        return clip_and_noise(hidden, attention_mask, self.hidden_scale,
                              self._generator(EVAL_HIDDEN_NOISE, step, batch))

    def on_generated_hidden(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """What the trunk receives instead of the hidden states (1, new, hidden) a generation sends at decoding
        ``position`` (0: the prompt). Give the generation a key of its own (``ClientSecret.with_nonce``)."""
        if self.hidden_scale <= 0:
            return hidden
        real = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)  # (1, new): no padding
        return clip_and_noise(hidden, real, self.hidden_scale, self._generator(GENERATION_HIDDEN_NOISE, position))
