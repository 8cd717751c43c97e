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
