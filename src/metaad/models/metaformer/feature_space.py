"""Metaformer's parts in feature space: A, P's weighting and T on the grid of a frozen backbone's features.

The paper's A reconstructs pixels (supplementary Table 1). On a textured surface a reconstruction through a
2×2 latent is a low-pass filter of the input, which cannot tell a hairline crack from the grain. Here A
reconstructs the frozen EfficientNet-Lite0 features of the image instead (the representation PatchCore and
Reverse Distillation detect in), standardised per channel on the images it adapts to; the anomaly map is the
per-location reconstruction error on that grid. P weights the map (and the loss) towards the salient object
and never multiplies the reconstruction; T re-weights the reconstruction on the grid, as §3.2 does on pixels.

One inner loop (:func:`inner_loop`) serves both meta-training (Algorithm 1's eq. 3, first order) and the
adaptation at test time, so what the meta-learned initialisation learned to do in a few steps is what
adaptation does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_TAPS = (2, 3, 4)  # EfficientNet-Lite0 stages at strides 8, 16 and 32 (40 + 112 + 320 channels)
OPTIMIZERS = ("adam", "sgd")


def feature_grid(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """A backbone's maps (finest first) as one (B, ΣC, H, W) grid at the finest map's resolution."""
    size = maps[0].shape[-2:]
    return torch.cat(
        [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
         for m in maps],
        dim=1,
    )


def channel_statistics(grids: Iterable[torch.Tensor], eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (plus ``eps`` in the variance) over every image and location of
    one or more (B, C, H, W) grids (chunks of one set, summed in float64)."""
    count, sums, squares = 0, None, None
    for grid in [grids] if isinstance(grids, torch.Tensor) else grids:
        values = grid.detach().double()
        part, part_squares = values.sum(dim=(0, 2, 3)), values.pow(2).sum(dim=(0, 2, 3))
        sums = part if sums is None else sums + part
        squares = part_squares if squares is None else squares + part_squares
        count += values.numel() // values.shape[1]
    if sums is None:
        raise ValueError("channel statistics need at least one grid")
    mean = sums / count
    variance = (squares / count - mean.pow(2)).clamp_min(0)
    return mean.float(), variance.add(eps).sqrt().float()


class FeatureAutoencoder(nn.Module):
    """A on the feature grid: 3×3 convolutions down to ``bottleneck`` channels a location and back, no spatial
    pooling (the grid is already 1/8 of the image), leaky ReLU; the last layer is linear (standardised
    features are signed)."""

    def __init__(self, channels: int, bottleneck: int = 32, hidden: int = 64, negative_slope: float = 0.2) -> None:
        super().__init__()
        if min(channels, bottleneck, hidden) < 1:
            raise ValueError(f"channels, bottleneck and hidden must be positive, got {channels}, {bottleneck}, "
                             f"{hidden}")
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.LeakyReLU(negative_slope),
            nn.Conv2d(hidden, bottleneck, 3, padding=1), nn.LeakyReLU(negative_slope),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(bottleneck, hidden, 3, padding=1), nn.LeakyReLU(negative_slope),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) standardised features → their reconstruction."""
        return self.decoder(self.encoder(grid))


class GridTransformer(nn.Module):
    """T(R; F̃) of §3.2 on the feature grid: a vanilla encoder-decoder transformer (8 heads, 3 + 3 layers);
    tokens are ``cell`` × ``cell`` cells of the grid: 4 × 4 (32 px at 256 px, an 8 × 8 token grid; §3.2 has
    16-pixel patches, four times the tokens, which cost five times as much on 2 cores). R's cells feed
    the encoder, the reconstruction's the decoder; the output R' (B, 1, H, W) = 2·sigmoid, starting at 1 (the
    head is zero-initialised), so that T begins as the identity and learns where to damp or amplify."""

    def __init__(self, channels: int, d_model: int = 64, cell: int = 4, layers: int = 3, heads: int = 8) -> None:
        super().__init__()
        self.cell = cell
        area = cell * cell
        self.embed_prior = nn.Linear(area, d_model)
        self.embed_reconstruction = nn.Linear(channels * area, d_model)
        self.transformer = nn.Transformer(
            d_model, nhead=heads, num_encoder_layers=layers, num_decoder_layers=layers,
            dim_feedforward=2 * d_model, dropout=0.0, batch_first=True,
        )
        self.head = nn.Linear(d_model, area)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, prior: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        b, _, h, w = reconstruction.shape
        if h % self.cell or w % self.cell:
            raise ValueError(f"the feature grid ({h}×{w}) must be a multiple of the {self.cell}-cell tokens")
        tokens_prior = F.unfold(prior, self.cell, stride=self.cell).transpose(1, 2)
        tokens_rebuilt = F.unfold(reconstruction, self.cell, stride=self.cell).transpose(1, 2)
        n = tokens_prior.shape[1]
        position = _sinusoid(n, self.embed_prior.out_features, reconstruction)
        out = self.head(self.transformer(self.embed_prior(tokens_prior) + position,
                                         self.embed_reconstruction(tokens_rebuilt) + position))
        cells = out.view(b, h // self.cell, w // self.cell, self.cell, self.cell).permute(0, 1, 3, 2, 4)
        return 2 * torch.sigmoid(cells.reshape(b, 1, h, w))


def _sinusoid(length: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Fixed sinusoidal positions (1, length, width) (no parameter, so any grid size works)."""
    position = torch.arange(length, dtype=like.dtype, device=like.device)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, dtype=like.dtype, device=like.device) * (-9.2103 / width))
    table = torch.zeros(length, width, dtype=like.dtype, device=like.device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : width // 2]
    return table[None]


def prior_weights(prior: torch.Tensor | None, strength: float) -> torch.Tensor | None:
    """P's weighting of R already on the feature grid: 1 + strength · R (errors on the salient object count up
    to 1 + strength times more; never zero, so a surface that P leaves out is still inspected)."""
    if prior is None or strength == 0:
        return None
    return 1 + strength * prior


def location_errors(grid: torch.Tensor, rebuilt: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) mean squared reconstruction error over channels, a location at a time."""
    return (grid - rebuilt).pow(2).mean(1, keepdim=True)


def weighted_loss(errors: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean of the location errors, weighted by P's weights when there are any."""
    if weights is None:
        return errors.mean()
    return (errors * weights).sum() / weights.expand_as(errors).sum()


def inner_loop(
    module: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    count: int,
    steps: int,
    lr: float,
    batch_size: int,
    optimizer: str = "adam",
    generator: torch.Generator | None = None,
) -> list[float]:
    """``steps`` optimiser steps on ``module`` (in place): each on a batch of ``batch_size`` of the ``count``
    examples (all of them when there are at most that many), ``loss_fn(index)`` giving the loss of a batch.
    The one loop of both meta-training's inner step and test-time adaptation. Returns the losses."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    losses = []
    for _ in range(steps):
        everything = count <= batch_size
        index = torch.arange(count) if everything else torch.randperm(count, generator=generator)[:batch_size]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(index)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
