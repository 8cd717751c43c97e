import pytest
import torch

from metaad.components.anomaly_synthesis import TextureSource
from metaad.models import create_model
from metaad.models.draem import focal_loss
from metaad.training.loop import train_model


def _train(n: int = 8, size: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pattern = 0.5 + 0.2 * torch.sin(xs / 3.0) * torch.cos(ys / 4.0)
    return (pattern.expand(n, 3, size, size) + 0.02 * torch.randn(n, 3, size, size, generator=generator)).clamp(0, 1)


def test_shapes_and_maps_at_the_input_size():
    model = create_model("draem", "tiny")
    reconstruction, logits = model(torch.rand(2, 3, 64, 64))
    assert reconstruction.shape == (2, 3, 64, 64) and logits.shape == (2, 2, 64, 64)
    model.fitted.fill_(True)
    prediction = model.predict(torch.rand(3, 3, 50, 90))
    assert prediction.scores.shape == (3,) and prediction.maps.shape == (3, 50, 90)
    assert prediction.maps.min() >= 0 and prediction.maps.max() <= 1  # a softmax probability
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("draem", image_size=100)


def test_paper_preset_has_the_reference_widths():
    paper = create_model("draem", "paper")
    assert sum(p.numel() for p in paper.parameters()) == pytest.approx(97.4e6, rel=0.01)  # vitjanz/draem: 97 M
    settings = paper.training_settings()
    assert (settings.epochs, settings.batch_size, settings.lr) == (700, 8, 1e-4)
    assert settings.lr_milestones == (0.8, 0.9) and settings.lr_gamma == 0.2


def test_focal_loss_rewards_the_right_segmentation():
    masks = torch.zeros(1, 1, 8, 8)
    masks[..., 2:5, 2:5] = 1
    right = torch.cat([1 - masks, masks], 1) * 8 - 4
    assert focal_loss(right, masks) < 1e-3 < focal_loss(-right, masks)


def test_simulated_training_pairs(tmp_path):
    from PIL import Image

    folder = tmp_path / "dtd" / "class"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "red.png")
    model = create_model("draem", "tiny", texture_dir=str(tmp_path / "dtd"), rotation_probability=0.0,
                         anomaly_kinds="textures")
    torch.manual_seed(0)
    good, simulated, masks = model.simulate(_train(4, 96))
    assert good.shape == simulated.shape == (4, 3, 32, 32) and masks.shape == (4, 1, 32, 32)  # at image_size
    assert torch.equal((simulated != good).any(1, keepdim=True), masks.bool())
    assert isinstance(model._textures, TextureSource) and len(model._textures.paths) == 1


def test_resume_is_bit_identical(tmp_path):
    train = _train()
    settings = {"epochs": 2}
    straight = create_model("draem", "tiny", **settings).fit(train, workdir=tmp_path / "straight")

    class StopTrainingError(Exception):
        pass

    def stop_after_first(epoch, model):
        if epoch == 1:
            raise StopTrainingError

    with pytest.raises(StopTrainingError):
        train_model(create_model("draem", "tiny", **settings), train, workdir=tmp_path / "resumed",
                    on_epoch_end=stop_after_first)
    resumed = create_model("draem", "tiny", **settings).fit(train, workdir=tmp_path / "resumed", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_grey_training_set_never_gets_a_coloured_anomaly(tmp_path):
    """The default simulator takes textures in luma on grey images (and adds grey-level surface defects), so
    colour cannot tell the simulated anomaly; the paper's preset keeps DTD's colours."""
    from PIL import Image

    from metaad.components.anomaly_synthesis import grey_images

    folder = tmp_path / "dtd" / "class"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "red.png")
    grey = _train(8, 64)[:, :1].expand(8, 3, 64, 64)
    torch.manual_seed(0)
    model = create_model("draem", "tiny", texture_dir=str(tmp_path / "dtd"), anomaly_probability=1.0)
    _, simulated, masks = model.simulate(grey)
    assert grey_images(simulated).all() and masks.flatten(1).amax(1).all()
    paper = create_model("draem", "tiny", texture_dir=str(tmp_path / "dtd"), anomaly_probability=1.0,
                         anomaly_colour="as_is", anomaly_kinds="textures")
    assert (~grey_images(paper.simulate(grey)[1])).sum() >= 6  # coloured, bar an augmentation that greys one
    assert create_model("draem", "paper").anomaly_colour == "as_is"


@pytest.mark.parametrize("size, window", [(64, 5), (128, 11)])
def test_score_window_scales_with_the_working_size(size, window, monkeypatch):
    """One hot pixel in the anomaly channel: the image score is its mean over the window, 1 / window²; the
    window is the reference's 21 px at 256 px, scaled (5 at 64 px, 11 at 128 px)."""
    model = create_model("draem", "tiny", image_size=size)

    def one_hot_pixel(images):
        logits = torch.full((len(images), 2, size, size), 0.0)
        logits[:, 0] = 30.0
        logits[:, :, size // 2, size // 2] = torch.tensor([0.0, 30.0])
        return images, logits

    monkeypatch.setattr(model, "forward", one_hot_pixel)
    scores, _ = model.export_forward(torch.rand(1, 3, size, size))
    assert float(scores[0]) == pytest.approx(1 / window**2, rel=1e-3)


def test_reference_initialisation():
    model = create_model("draem", "cpu")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    weights = torch.cat([m.weight.detach().flatten() for m in convs])
    assert weights.std() == pytest.approx(0.02, rel=0.05) and abs(float(weights.mean())) < 1e-3
    assert torch.cat([m.weight.detach() for m in norms]).std() == pytest.approx(0.02, rel=0.2)
