"""UniAD: the neighbour mask, the layer-wise query decoder's invariance, feature jitter, the constructor's checks,
the paper preset's plumbing, bit-identical resume and the loop's gradient clipping."""

import pytest
import torch

from conftest import assert_resume_is_bit_identical
from metaad.models import create_model
from metaad.models.uniad import UniAD, feature_jitter, neighbour_mask

TINY = UniAD.PRESETS["tiny"]


def test_the_neighbour_mask_hides_exactly_the_window_around_each_token():
    mask = neighbour_mask(5, 6, 3)
    assert mask.shape == (30, 30)
    hidden = torch.isinf(mask)
    assert hidden.diagonal().all()  # a token never sees itself
    centre = 2 * 6 + 3  # row 2, column 3: a full 3×3 window
    assert hidden[centre].sum() == 9
    assert hidden[centre].view(5, 6)[1:4, 2:5].all()
    assert hidden[0].sum() == 4  # the corner's window is clipped at the border
    assert (mask[~hidden] == 0).all()


def _tiny_model(**overrides) -> UniAD:
    model = UniAD(**{**TINY, "dropout": 0.0, **overrides}).eval()
    model.fitted.fill_(True)
    return model


def test_a_decoder_layer_ignores_memory_inside_the_tokens_own_neighbourhood():
    model = _tiny_model(image_size=96)  # a 6×6 grid; 3×3 windows
    layer, positions, mask = model.decoder[0], model.positions().unsqueeze(0), model.attention_mask
    generator = torch.Generator().manual_seed(0)
    tokens, hidden = model.grid**2, model.hidden
    previous = torch.randn(1, tokens, hidden, generator=generator)
    memory = torch.randn(1, tokens, hidden, generator=generator)
    token = 2 * model.grid + 3
    inside = torch.isinf(mask[token])
    changed = memory.clone()
    changed[0, inside] += 5 * torch.randn(int(inside.sum()), hidden, generator=generator)
    with torch.no_grad():
        before = layer(previous, memory, positions, mask)[0, token]
        after = layer(previous, changed, positions, mask)[0, token]
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
        # the same change outside the window does reach the token (so the check above can fail)
        outside = memory.clone()
        outside[0, ~inside] += 5 * torch.randn(int((~inside).sum()), hidden, generator=generator)
        assert not torch.allclose(layer(previous, outside, positions, mask)[0, token], before, atol=1e-3)


def test_the_encoders_attention_ignores_keys_and_values_inside_the_neighbourhood():
    model = _tiny_model(image_size=96)
    attention, mask = model.encoder[0].attention, model.attention_mask
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, model.grid**2, model.hidden, generator=generator)
    token = 7
    inside = torch.isinf(mask[token])
    keys = x.clone()
    keys[0, inside] = torch.randn(int(inside.sum()), model.hidden, generator=generator)
    with torch.no_grad():
        before = attention(x, x, x, attn_mask=mask, need_weights=False)[0][0, token]
        after = attention(x, keys, keys, attn_mask=mask, need_weights=False)[0][0, token]
        unmasked = attention(x, keys, keys, need_weights=False)[0][0, token]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert not torch.allclose(unmasked, before, atol=1e-3)


def test_feature_jitter_scales_with_each_tokens_norm():
    torch.manual_seed(0)
    tokens = torch.cat([torch.ones(1, 2000, 192), 10 * torch.ones(1, 2000, 192)], dim=1)
    noise = feature_jitter(tokens, 16.0) - tokens
    expected = 16.0 * tokens.norm(dim=-1) / 192  # the standard deviation per token
    assert noise[0, :2000].std().item() == pytest.approx(expected[0, 0].item(), rel=0.02)
    assert noise[0, 2000:].std().item() == pytest.approx(expected[0, -1].item(), rel=0.02)


def test_the_default_jitter_keeps_the_references_noise_to_norm_ratio():
    model = UniAD(**{**TINY, "image_size": 64})  # Lite0 taps at strides 2/4/8/16: 16 + 24 + 40 + 112
    assert model.channels == 192
    assert model.effective_jitter_scale == pytest.approx(20 * (192 / 272) ** 0.5)
    assert model.effective_jitter_scale / 192**0.5 == pytest.approx(20 / 272**0.5)
    assert UniAD(**{**TINY, "jitter_scale": 5.0}).effective_jitter_scale == 5.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": 72}, "multiple of the deepest tap's stride"),
        ({"image_size": 64, "neighbourhood": 5}, "attend to nothing"),
        ({"image_size": 96, "neighbourhood": 7}, "attend to nothing"),
        ({"hidden": 30, "heads": 4}, "multiple of heads"),
        ({"pool": 0}, "pool"),
        ({"jitter_probability": 1.5}, "jitter_probability"),
    ],
)
def test_a_configuration_that_cannot_work_is_refused_when_built(overrides, message):
    with pytest.raises(ValueError, match=message):
        UniAD(**{**TINY, **overrides})


def test_the_largest_neighbourhood_a_grid_allows_gives_finite_scores():
    model = _tiny_model(image_size=96, neighbourhood=5)  # 6×6 grid: a 5×5 window leaves each token 11 or more
    prediction = model.predict(torch.rand(2, 3, 96, 96))
    assert torch.isfinite(prediction.scores).all() and torch.isfinite(prediction.maps).all()


def test_the_paper_preset_builds_efficientnet_b4_taps_and_trains_with_random_weights():
    model = create_model("uniad", "paper", weights="none", image_size=128, epochs=1, batch_size=2,
                         hidden=32, heads=2, encoder_layers=1, decoder_layers=1, feedforward=32, neighbourhood=3)
    assert model.backbone == "tf_efficientnet_b4" and model.channels == 24 + 32 + 56 + 160
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    scores = model.fit(images).predict(images).scores
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_the_paper_preset_without_weights_says_what_it_needs():
    with pytest.raises(Exception, match="weights=PATH"):
        create_model("uniad", "paper", image_size=64, hidden=32, heads=2, encoder_layers=1, decoder_layers=1,
                     neighbourhood=1).fit(torch.rand(2, 3, 64, 64))


def test_interrupted_and_resumed_training_ends_bit_identical(tmp_path):
    images = torch.rand(10, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert_resume_is_bit_identical(lambda: UniAD(**{**TINY, "epochs": 3, "batch_size": 4}), images, tmp_path)


def test_training_uses_the_papers_optimiser_and_clipping():
    settings = UniAD(**TINY).training_settings()
    assert settings.optimizer == "adamw" and settings.gradient_clip_norm == 0.1 and settings.weight_decay == 1e-4
    assert settings.lr_milestones == (0.8,) and settings.lr_gamma == 0.1
