"""UniAD (You et al., "A Unified Model for Multi-class Anomaly Detection", NeurIPS 2022; MIAD A.2.6).

One transformer reconstructs the frozen backbone's features of every product it was trained on; where it cannot,
there is an anomaly. Pipeline, top to bottom:

1. frozen backbone taps at strides 2/4/8/16, each resized to the stride-16 grid and concatenated (the authors'
   MFCN neck), C channels;
2. one token per grid location, ``Linear(C → hidden)``; during training, **feature jitter** (§3.4) adds
   Gaussian noise scaled by each token's norm to the tokens before the projection;
3. a transformer encoder and a **layer-wise query decoder** (§3.3): every decoder layer starts from its own
   learned query embedding, attends to the encoder's output and then to the previous layer's output; learned
   row and column position embeddings are added to queries and keys only; post-norm;
4. **neighbour-masked attention** (§3.2): a token may not attend to its own k×k neighbourhood (itself included),
   in the encoder's self-attention and in both decoder attentions, so that it cannot copy its input through;
5. ``Linear(hidden → C)``; the loss is the MSE between the reconstruction and the un-jittered features;
6. the anomaly map is the per-location L2 norm of the reconstruction error, upsampled to the image; the image
   score is the maximum of the map after a 16 × 16 average pool (the authors' evaluation).

The authors' code (zhiyuanyou/UniAD) evaluates on the test set every 10 epochs and keeps the best checkpoint,
and flips an AUROC below 0.5; metaad does neither (it reports the last epoch).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metaad.backbones import Backbone
from metaad.components.estimator import marking_fitted, predict_in_batches
from metaad.components.feature_cache import FrozenFeatures, frozen_part_key
from metaad.components.preprocess import Preprocess
from metaad.training.data import TrainImages
from metaad.training.loop import train_model
from metaad.types import AnomalyPrediction, EpochEnd, TrainData, TrainingSettings, device_of

REFERENCE_CHANNELS = 272  # EfficientNet-B4's taps at strides 2/4/8/16: 24 + 32 + 56 + 160
REFERENCE_JITTER_SCALE = 20.0


def neighbour_mask(height: int, width: int, neighbourhood: int) -> torch.Tensor:
    """(HW, HW) additive attention mask: −inf where the key lies in the query's ``neighbourhood`` ×
    ``neighbourhood`` window (clipped at the border; the query itself included), 0 elsewhere (§3.2)."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    half = neighbourhood // 2
    inside = ((rows[:, None] - rows[None, :]).abs() <= half) & ((cols[:, None] - cols[None, :]).abs() <= half)
    return torch.zeros(inside.shape).masked_fill(inside, float("-inf"))


def feature_jitter(tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """§3.4: tokens (B, N, C) plus Gaussian noise of standard deviation scale · ‖token‖₂ / C, per token."""
    norms = tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1]
    return tokens + torch.randn_like(tokens) * norms * scale


class LearnedPositions(nn.Module):
    """Learned row and column embeddings, each half the width, concatenated per location: (HW, hidden)."""

    def __init__(self, height: int, width: int, hidden: int) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.empty(height, hidden // 2))
        self.cols = nn.Parameter(torch.empty(width, hidden - hidden // 2))

    def forward(self) -> torch.Tensor:
        height, width = len(self.rows), len(self.cols)
        grid = torch.cat([self.cols.unsqueeze(0).expand(height, -1, -1),
                          self.rows.unsqueeze(1).expand(-1, width, -1)], dim=-1)
        return grid.flatten(0, 1)


class FeedForward(nn.Sequential):
    def __init__(self, hidden: int, feedforward: int, dropout: float) -> None:
        super().__init__(nn.Linear(hidden, feedforward), nn.ReLU(), nn.Dropout(dropout), nn.Linear(feedforward, hidden))


class EncoderLayer(nn.Module):
    """Post-norm self-attention (positions on queries and keys, the neighbour mask) and feed-forward."""

    def __init__(self, hidden: int, heads: int, feedforward: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.feedforward = FeedForward(hidden, feedforward, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention(x + positions, x + positions, x, attn_mask=mask, need_weights=False)[0]
        x = self.norm1(x + self.dropout1(attended))
        return self.norm2(x + self.dropout2(self.feedforward(x)))


class QueryDecoderLayer(nn.Module):
    """§3.3's layer-wise query: the layer's own learned queries attend to the encoder's output (``memory``),
    then to the previous layer's output (``previous``; the first layer's is the memory), then feed-forward."""

    def __init__(self, tokens: int, hidden: int, heads: int, feedforward: int, dropout: float) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.empty(tokens, hidden))
        self.memory_attention = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.previous_attention = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.feedforward = FeedForward(hidden, feedforward, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, previous: torch.Tensor, memory: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        q = self.queries.unsqueeze(0).expand(memory.shape[0], -1, -1)
        attended = self.memory_attention(q + positions, memory + positions, memory, attn_mask=mask,
                                         need_weights=False)[0]
        q = self.norm1(q + self.dropout1(attended))
        attended = self.previous_attention(q + positions, previous + positions, previous, attn_mask=mask,
                                           need_weights=False)[0]
        q = self.norm2(q + self.dropout2(attended))
        return self.norm3(q + self.dropout3(self.feedforward(q)))


class UniAD(nn.Module):
    """UniAD: a neighbour-masked transformer that reconstructs frozen features (see the module docstring).

    Args:
        backbone: timm architecture of the frozen extractor (default the offline EfficientNet-Lite0; the
            paper's ``"tf_efficientnet_b4"`` needs ``weights=PATH``: the authors' own file is a port of the
            TensorFlow EfficientNet weights, which timm's ``tf_`` variant loads).
        layers: the taps (indices into timm's ``feature_info``; default strides 2/4/8/16: Lite0's 16 + 24 + 40 +
            112 = 192 channels, B4's 24 + 32 + 56 + 160 = 272).
        weights: backbone weights (None: the offline package; a path; or "hub").
        image_size: the side images are resized to (the paper: 224); a multiple of the deepest tap's stride.
        hidden, heads, encoder_layers, decoder_layers, feedforward, dropout: the transformer (the paper: 256, 8,
            4, 4, 1024, 0.1).
        neighbourhood: side k of the masked k × k window (the paper: 7); the grid must leave every token
            something to attend to.
        jitter_scale: §3.4's feature-jitter scale α (noise std = α · ‖token‖ / C). None (default) carries the
            reference's α = 20 at C = 272 over to this backbone's C by keeping the noise-to-feature norm ratio
            α / √C ≈ 1.21: α = 20 · √(C / 272) (16.8 for Lite0's 192 channels). 0 turns jitter off.
        jitter_probability: the chance a batch is jittered (the paper: 1).
        pool: side of the average pool over the full-size map before its maximum is the image score (16).
        standardize_features: reconstruct the features standardised per channel with the training images'
            mean and standard deviation (a metaad addition; the paper reconstructs them raw). Lite0's taps have
            a spread of 3-11 and means up to 15 per channel, far from the unit scale of the decoder's layer
            norm, which a CPU schedule of a few thousand steps cannot bridge at lr 1e-4.
        standardize_images: "auto", "always" or "never" (the paper): PatchCore's exposure standardisation
            (``metaad.components.preprocess.Preprocess``). A metaad addition.
        epochs, batch_size, lr, weight_decay, gradient_clip_norm, lr_drop_at: AdamW with a ×0.1 step at
            ``lr_drop_at`` × epochs (A.2.6: lr 1e-4, weight decay 1e-4, clipping 0.1, batch 64, 500 epochs
            with the drop at 400).
        predict_batch_size: images per forward pass at prediction.
        seed: seeds the weights' initialisation (Xavier-uniform, as the authors) and the training order.

    The defaults are sized for 2 cores and chosen on held-out defect-free MTD training images with low-contrast
    synthetic defects (``benchmarks/epoch_validation.py --defects subtle``; no test image read; the rule, the
    candidates and their figures are in ``benchmarks/NOTES.md``): the paper's transformer at half width and
    half depth (the full one is 6x slower a step and over 80 ms an image), features standardised, lr 1e-3 (at
    1e-4 it stays at chance within the budget), 20 epochs on cached features, about 25 minutes for 1,000
    images. It was still improving at 30 epochs: UniAD wants longer schedules than the budget allows.
    Presets: ``"paper"`` (A.2.6: EfficientNet-B4 through ``weights=PATH``, 224 px, raw features, lr 1e-4, 500
    epochs), ``"cpu"`` (the defaults) and ``"tiny"`` (tests).
    """

    SAVED_WITHOUT: ClassVar[dict[str, object]] = {}  # nothing saved before UniAD existed
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {"backbone": "tf_efficientnet_b4", "image_size": 224, "hidden": 256, "heads": 8,
                  "encoder_layers": 4, "decoder_layers": 4, "feedforward": 1024, "epochs": 500, "batch_size": 64,
                  "lr": 1e-4, "standardize_features": False, "standardize_images": "never"},
        "cpu": {},
        "tiny": {"image_size": 64, "hidden": 32, "heads": 2, "encoder_layers": 1, "decoder_layers": 1,
                 "feedforward": 64, "neighbourhood": 3, "epochs": 3, "batch_size": 4},
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0", layers: tuple[int, ...] = (0, 1, 2, 3), weights: str | None = None,
        image_size: int = 256,
        hidden: int = 128, heads: int = 4, encoder_layers: int = 2, decoder_layers: int = 2, feedforward: int = 512,
        dropout: float = 0.1, neighbourhood: int = 7,
        jitter_scale: float | None = None, jitter_probability: float = 1.0, pool: int = 16,
        standardize_features: bool = True, standardize_images: str = "auto",
        epochs: int = 20, batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 1e-4,
        gradient_clip_norm: float | None = 0.1, lr_drop_at: float = 0.8,
        predict_batch_size: int = 16, seed: int = 0,
    ) -> None:
        super().__init__()
        self.backbone, self.layers, self.weights = backbone, tuple(layers), weights
        self.image_size = image_size
        self.hidden, self.heads = hidden, heads
        self.encoder_layers, self.decoder_layers = encoder_layers, decoder_layers
        self.feedforward, self.dropout, self.neighbourhood = feedforward, dropout, neighbourhood
        self.jitter_scale, self.jitter_probability, self.pool = jitter_scale, jitter_probability, pool
        self.standardize_features, self.standardize_images = standardize_features, standardize_images
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay
        self.gradient_clip_norm, self.lr_drop_at = gradient_clip_norm, lr_drop_at
        self.predict_batch_size, self.seed = predict_batch_size, seed
        self.feature_extractor = Backbone(backbone, self.layers)
        self.preprocess = Preprocess(image_size, standardize_images, self.feature_extractor.normalization)
        stride = max(self.feature_extractor.reductions)
        if not isinstance(image_size, int) or image_size < stride or image_size % stride:
            raise ValueError(
                f"image_size must be a multiple of the deepest tap's stride ({stride}), got {image_size!r}"
            )
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        if encoder_layers < 1 or decoder_layers < 1:
            raise ValueError(f"need at least one encoder and one decoder layer, got {encoder_layers}, {decoder_layers}")
        if not 0 <= jitter_probability <= 1 or (jitter_scale is not None and jitter_scale < 0):
            raise ValueError(f"jitter_probability must be in [0, 1] and jitter_scale >= 0, got "
                             f"{jitter_probability} and {jitter_scale}")
        if not isinstance(pool, int) or not 1 <= pool <= image_size:
            raise ValueError(f"pool must be an integer from 1 to image_size ({image_size}), got {pool!r}")
        if not isinstance(neighbourhood, int) or neighbourhood < 0:
            raise ValueError(f"neighbourhood must be a non-negative integer (0: no mask), got {neighbourhood!r}")
        self.grid = image_size // stride
        mask = neighbour_mask(self.grid, self.grid, neighbourhood) if neighbourhood else torch.zeros(
            self.grid**2, self.grid**2)
        if torch.isinf(mask).all(dim=1).any():
            raise ValueError(
                f"a {neighbourhood}x{neighbourhood} neighbour mask hides every token of the {self.grid}x{self.grid} "
                f"grid ({image_size} px / stride {stride}) from some token, which would attend to nothing: use a "
                f"larger image_size or a smaller neighbourhood"
            )
        self.register_buffer("attention_mask", mask, persistent=False)
        channels = sum(self.feature_extractor.channels)
        self.channels = channels
        self.register_buffer("feature_mean", torch.zeros(channels))  # set by fit (standardize_features)
        self.register_buffer("feature_std", torch.ones(channels))
        with torch.random.fork_rng(devices=[]):  # same seed, same weights; the global RNG is untouched
            torch.manual_seed(seed)
            tokens = self.grid**2
            self.input_projection = nn.Linear(channels, hidden)
            self.positions = LearnedPositions(self.grid, self.grid, hidden)
            self.encoder = nn.ModuleList(EncoderLayer(hidden, heads, feedforward, dropout)
                                         for _ in range(encoder_layers))
            self.decoder = nn.ModuleList(QueryDecoderLayer(tokens, hidden, heads, feedforward, dropout)
                                         for _ in range(decoder_layers))
            self.decoder_norm = nn.LayerNorm(hidden)
            self.output_projection = nn.Linear(hidden, channels)
            for parameter in self.parameters():  # the authors' initializer: Xavier-uniform on every matrix
                if parameter.requires_grad and parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def effective_jitter_scale(self) -> float:
        """α actually used: ``jitter_scale``, or the reference's noise-to-norm ratio carried over to C."""
        if self.jitter_scale is not None:
            return float(self.jitter_scale)
        return REFERENCE_JITTER_SCALE * (self.channels / REFERENCE_CHANNELS) ** 0.5

    def fit_summary(self) -> dict:
        return {**self.preprocess.fit_summary(), "jitter_scale": self.effective_jitter_scale,
                "channels": self.channels, "grid": self.grid}

    # ------------------------------------------------------------------------------------------ features
    @torch.no_grad()
    def frozen_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The taps resized to the stride-16 grid and concatenated, (B, C, g, g) (the MFCN neck; what the
        feature cache holds)."""
        taps = self.feature_extractor(self.preprocess(images))
        size = (self.grid, self.grid)
        aligned = [t if t.shape[-2:] == size else F.interpolate(t, size=size, mode="bilinear", align_corners=True)
                   for t in taps]
        return [torch.cat(aligned, dim=1).contiguous()]

    def standardized(self, features: torch.Tensor) -> torch.Tensor:
        """Features in the units the transformer reconstructs (per-channel standardised, or as they are)."""
        if not self.standardize_features:
            return features
        return (features - self.feature_mean.view(1, -1, 1, 1)) / self.feature_std.view(1, -1, 1, 1)

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        """The transformer's reconstruction (B, C, g, g) of aligned features; jittered inputs in training."""
        tokens = features.flatten(2).transpose(1, 2)  # (B, g·g, C)
        scale = self.effective_jitter_scale
        if self.training and scale > 0 and float(torch.rand(())) < self.jitter_probability:
            tokens = feature_jitter(tokens, scale)
        x = self.input_projection(tokens)
        positions, mask = self.positions().unsqueeze(0), self.attention_mask
        for layer in self.encoder:
            x = layer(x, positions, mask)
        memory, output = x, x
        for layer in self.decoder:
            output = layer(output, memory, positions, mask)
        rebuilt = self.output_projection(self.decoder_norm(output))
        return rebuilt.transpose(1, 2).reshape(features.shape)

    # ------------------------------------------------------------------------------------------ training
    def training_settings(self) -> TrainingSettings:
        """A.2.6: AdamW, lr 1e-4, weight decay 1e-4, gradient norm clipped at 0.1, ×0.1 late in training."""
        return TrainingSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer="adamw",
                                weight_decay=self.weight_decay, gradient_clip_norm=self.gradient_clip_norm,
                                lr_milestones=(self.lr_drop_at,) if self.lr_drop_at < 1 else (), lr_gamma=0.1,
                                seed=self.seed)

    def training_loss(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """MSE between the reconstruction of jittered features and the clean features."""
        features = self.standardized(maps[0])
        return F.mse_loss(self.reconstruct(features), features)

    def fit(self, train: TrainData, *, progress: bool = False, workdir: str | Path | None = None,
            resume: bool = False, on_epoch_end: EpochEnd | None = None) -> UniAD:
        """Train the transformer on defect-free images with the shared loop, on the frozen aligned features
        computed once (``metaad.components.feature_cache``)."""
        self.feature_extractor.load_weights(self.weights)
        images = TrainImages.from_data(train)
        self.preprocess.measure(images.batches())
        features = FrozenFeatures(self, self.frozen_maps, images,
                                  frozen_part_key(self.feature_extractor, self.preprocess), device=device_of(self))
        if self.standardize_features:
            self._measure_features(features)
        train_model(self, features, progress=progress, workdir=workdir, resume=resume,
                    on_epoch_end=marking_fitted(self, on_epoch_end))
        self.fitted.fill_(True)
        return self.eval()

    @torch.no_grad()
    def _measure_features(self, features: FrozenFeatures) -> None:
        """Per-channel mean and standard deviation of the training features (over images and locations)."""
        total = torch.zeros(self.channels, dtype=torch.float64)
        squares = torch.zeros(self.channels, dtype=torch.float64)
        count = 0
        for index in torch.arange(len(features)).split(64):
            (batch,) = features[index]
            values = batch.double().transpose(0, 1).flatten(1)
            total += values.sum(1)
            squares += values.square().sum(1)
            count += values.shape[1]
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt()
        self.feature_mean.copy_(mean.float())
        self.feature_std.copy_(std.float().clamp_min(1e-6))

    # ------------------------------------------------------------------------------------------- predict
    def export_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,) and maps (B, H, W): the per-location L2 norm of the reconstruction error, upsampled;
        the score is the maximum of the map at ``image_size`` after a ``pool`` × ``pool`` average pool."""
        features = self.standardized(self.frozen_maps(images)[0])
        error = (self.reconstruct(features) - features).pow(2).sum(1, keepdim=True).sqrt()
        full = F.interpolate(error, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        pooled = F.avg_pool2d(full, self.pool, stride=1) if self.pool > 1 else full
        scores = pooled.flatten(1).amax(1)
        maps = F.interpolate(error, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return scores, maps

    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        """Scores (B,) and maps (B, H, W) at the input size, from (B, 3, H, W) images in [0, 1]."""
        return predict_in_batches(self, images, self.predict_batch_size, self.export_forward,
                                  fitted=bool(self.fitted))
