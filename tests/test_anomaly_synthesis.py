import numpy as np
import pytest

from metaad.components.anomaly_synthesis import paste_anomaly, perlin_noise


def test_perlin_noise_is_smooth_bounded_and_seeded():
    a = perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    b = perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    assert np.array_equal(a, b) and a.shape == (64, 64)
    assert np.abs(a).max() <= 1.5 and a.std() > 0.1
    assert np.abs(np.diff(a, axis=1)).max() < 0.3  # neighbouring pixels differ little: smooth noise
    assert np.allclose(a[::16, ::16], 0.0, atol=1e-9)  # gradient noise vanishes on lattice points


def test_pasted_anomaly_changes_only_the_masked_pixels():
    rng = np.random.default_rng(1)
    image = np.full((32, 32, 3), 0.5)
    texture = np.zeros((32, 32, 3))
    defective, mask = paste_anomaly(image, texture, rng, opacity=(0.5, 0.5))
    assert mask.any() and not mask.all()
    assert np.array_equal(defective[~mask], image[~mask])
    assert np.allclose(defective[mask], 0.25)
    with pytest.raises(ValueError, match="must match"):
        paste_anomaly(image, texture[:16], rng)


# ------------------------------------------------------------------------------------- batched torch simulator
def _texture_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "textures" / "striped"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, suffix in enumerate([".png", ".JPG"]):  # extensions matched case-insensitively
        Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 30, 3), dtype=np.uint8)).save(folder / f"t{i}{suffix}")
    return tmp_path / "textures"


@pytest.mark.parametrize("size", [(45, 70), (97, 33)])
@pytest.mark.parametrize("source", ["generated", "folder"])
def test_simulated_masks_are_exactly_the_changed_pixels(size, source, tmp_path):
    import torch

    from metaad.components.anomaly_synthesis import TextureSource, augment_textures, simulate_anomalies

    generator = torch.Generator().manual_seed(0)
    textures = TextureSource(_texture_folder(tmp_path) if source == "folder" else None)
    images = torch.rand(6, 3, *size, generator=generator)
    sampled = augment_textures(textures.sample(6, size, generator), generator=generator)
    assert sampled.shape == (6, 3, *size) and sampled.dtype == torch.uint8
    simulated, masks = simulate_anomalies(images, sampled, probability=0.5, generator=generator)
    assert simulated.shape == images.shape and masks.shape == (6, 1, *size)
    changed = (simulated != images).any(1, keepdim=True)
    assert torch.equal(changed, masks.bool())
    assert 0 < int(masks.flatten(1).amax(1).sum()) < 6  # some images got an anomaly, some not
    assert simulated.min() >= 0 and simulated.max() <= 1


def test_torch_perlin_matches_lattice_and_masks_are_seeded():
    import torch

    from metaad.components.anomaly_synthesis import perlin_masks, perlin_noise_torch, rotate_images

    noise = perlin_noise_torch((48, 80), (3, 5), torch.Generator().manual_seed(0))
    assert noise.shape == (48, 80) and noise.std() > 0.1
    assert torch.allclose(noise[::16, ::16], torch.zeros(3, 5), atol=1e-6)  # zero on lattice points
    a = perlin_masks(3, (50, 31), generator=torch.Generator().manual_seed(1))
    b = perlin_masks(3, (50, 31), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.flatten(1).any(1).all()  # seeded, never empty
    images = torch.rand(4, 3, 30, 50)
    assert torch.equal(rotate_images(images, probability=0.0), images)
    assert rotate_images(images, probability=1.0).shape == images.shape


def test_no_texture_folder_is_a_clear_error(tmp_path):
    from metaad.components.anomaly_synthesis import TextureSource

    with pytest.raises(ValueError, match="no texture images"):
        TextureSource(tmp_path)


# ------------------------------------------------------------------------------ grey-level surface defects
@pytest.mark.parametrize("kind", ["crack", "pit", "stain", "shading"])
def test_surface_defects_are_grey_low_contrast_and_masked(kind):
    import torch

    from metaad.components.anomaly_synthesis import grey_images, surface_defects

    images = torch.full((6, 3, 96, 96), 0.5)
    simulated, masks = surface_defects(images, kinds=(kind,), generator=torch.Generator().manual_seed(0))
    assert grey_images(simulated).all() and masks.flatten(1).amax(1).all()
    for change, mask in zip((simulated - images).abs()[:, 0], masks[:, 0].bool(), strict=True):
        inside, outside = change[mask], change[~mask]
        assert inside.min() > 0 and inside.max() <= 0.3 * 0.5 + 1e-6  # at most 30% of the grey level
        assert outside.max() <= inside.max() / 2 + 1e-6  # the mask holds the stronger half of the change


def test_cracks_are_a_few_pixels_wide_at_any_size():
    """A crack's area over its length (its width) is 1-3 px at 256 px and scales with the image."""
    import torch

    from metaad.components.anomaly_synthesis import surface_defects

    widths = {}
    for size in (128, 256):
        _, masks = surface_defects(torch.full((12, 3, size, size), 0.5), kinds=("crack",),
                                   generator=torch.Generator().manual_seed(0))
        areas = masks.flatten(1).sum(1)
        spans = torch.tensor([float(max(np.ptp(np.nonzero(m[0].numpy())[0]), np.ptp(np.nonzero(m[0].numpy())[1])))
                              for m in masks])
        widths[size] = float((areas / spans.clamp(min=1)).median())
    assert widths[256] < 6 and widths[128] < widths[256]


def test_anomaly_options_are_checked():
    import torch

    from metaad.components.anomaly_synthesis import simulate_anomalies

    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="kinds"):
        simulate_anomalies(images, images, kinds="paint")
    with pytest.raises(ValueError, match="colour"):
        simulate_anomalies(images, images, colour="grey")


@pytest.mark.parametrize("name, setting", [("draem", "anomaly_kinds"), ("unet_autoencoder", "corruption_colour"),
                                           ("glance", "stain_colour")])
def test_each_method_names_its_anomaly_setting_when_it_is_wrong(name, setting):
    from metaad.models import create_model

    with pytest.raises(ValueError, match=f"{setting} must be one of"):
        create_model(name, "tiny", **{setting: "paint"})
