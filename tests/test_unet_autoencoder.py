import pytest
import torch

from metaad.models import create_model
from metaad.training.loop import train_model

SIZE = 64


def _texture(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    pattern = 0.5 + 0.2 * torch.sin(xs / 3.0) * torch.cos(ys / 4.0)
    return (pattern.expand(n, 3, SIZE, SIZE) + 0.02 * torch.randn(n, 3, SIZE, SIZE, generator=generator)).clamp(0, 1)


def test_shapes_skips_and_both_map_types():
    model = create_model("unet_autoencoder", "tiny")
    assert model(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 3, SIZE, SIZE)
    assert [model.unet.uses_skip(level) for level in range(4)] == [False, False, False, True]
    for map_type in ("l2", "ssim"):
        model = create_model("unet_autoencoder", "tiny", map_type=map_type)
        model.fitted.fill_(True)
        prediction = model.predict(torch.rand(3, 3, 50, 90))
        assert prediction.scores.shape == (3,) and prediction.maps.shape == (3, 50, 90)
        assert torch.isfinite(prediction.maps).all()
    with pytest.raises(ValueError, match="map_type"):
        create_model("unet_autoencoder", map_type="l1")


def test_a_pasted_defect_is_restored_not_copied():
    """An identity network reconstructs the defect itself (distance 0); this one is pulled to good texture."""
    model = create_model("unet_autoencoder", "tiny", epochs=12).fit(_texture(16, 0))
    good = _texture(2, 1)
    defective = good.clone()
    defective[:, :, 20:36, 24:40] = torch.tensor([0.95, 0.1, 0.1]).view(1, 3, 1, 1)
    with torch.no_grad():
        reconstruction = model.eval()(defective)[:, :, 20:36, 24:40]
    to_good = (reconstruction - good[:, :, 20:36, 24:40]).square().mean()
    to_itself = (reconstruction - defective[:, :, 20:36, 24:40]).square().mean()
    assert to_good < to_itself, (float(to_good), float(to_itself))


def test_resume_is_bit_identical(tmp_path):
    train = _texture(8, 0)
    straight = create_model("unet_autoencoder", "tiny").fit(train, workdir=tmp_path / "straight")

    class StopTrainingError(Exception):
        pass

    def stop_after_first(epoch, model):
        if epoch == 1:
            raise StopTrainingError

    with pytest.raises(StopTrainingError):
        train_model(create_model("unet_autoencoder", "tiny"), train, workdir=tmp_path / "resumed",
                    on_epoch_end=stop_after_first)
    resumed = create_model("unet_autoencoder", "tiny").fit(train, workdir=tmp_path / "resumed", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_map_smoothing_scales_with_the_working_size(monkeypatch):
    """A one-pixel residual blurred by σ = 4 px at 256 px: σ 1 at 64 px and 2 at 128 px, so the peak of the
    128 px map is a quarter of the 64 px one's (a 2-D Gaussian's peak falls as 1 / σ²)."""
    peaks = {}
    for size in (64, 128):
        model = create_model("unet_autoencoder", "tiny", image_size=size)

        def off_by_one_pixel(images, size=size):
            out = images.clone()
            out[:, :, size // 2, size // 2] += 1.0
            return out

        monkeypatch.setattr(model, "forward", off_by_one_pixel)
        scores, _ = model.export_forward(torch.full((1, 3, size, size), 0.5))
        peaks[size] = float(scores[0])
    assert peaks[64] / peaks[128] == pytest.approx(4.0, rel=0.1)


def test_a_grey_set_gets_grey_corruptions():
    from metaad.components.anomaly_synthesis import generate_textures, grey_images, simulate_anomalies

    grey = _texture(6, 0)[:, :1].expand(6, 3, SIZE, SIZE)
    textures = generate_textures(6, (SIZE, SIZE), torch.Generator().manual_seed(0))
    for kinds in ("textures", "surface", "mixed"):
        simulated, masks = simulate_anomalies(grey, textures, probability=1.0, colour="auto", kinds=kinds,
                                              generator=torch.Generator().manual_seed(1))
        assert grey_images(simulated).all() and masks.flatten(1).amax(1).all(), kinds
    assert create_model("unet_autoencoder").corruption_colour == "auto"
