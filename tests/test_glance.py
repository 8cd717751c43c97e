"""Glancing at the Patch: partial convolution, IDW fusion, the networks' shapes, stains, bit-identical resume."""

import pytest
import torch

from metaad.components.partial_conv import PartialConv2d
from metaad.models import create_model
from metaad.models.glance import (
    DADHead,
    GlobalNet,
    LocalNet,
    grid_origins,
    idw_map,
    random_stains,
    training_patches,
)


def test_partial_conv_is_a_convolution_when_nothing_is_masked():
    torch.manual_seed(0)
    layer = PartialConv2d(3, 8, 3, 2)
    x = torch.randn(2, 3, 17, 17)
    y, mask = layer(x, torch.ones(2, 1, 17, 17))
    assert torch.allclose(y, torch.nn.functional.conv2d(x, layer.weight, layer.bias, 2), atol=1e-6)
    assert torch.equal(mask, torch.ones(2, 1, 8, 8))


def test_partial_conv_ignores_masked_pixels_and_renormalises():
    torch.manual_seed(0)
    layer = PartialConv2d(1, 1, 3, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    mask = torch.ones(1, 1, 5, 5)
    mask[..., 1:3, 1:3] = 0
    x = torch.rand(1, 1, 5, 5)
    changed = x.clone()
    changed[..., 1:3, 1:3] = 100.0
    y, new_mask = layer(x, mask)
    assert torch.equal(y, layer(changed, mask)[0])
    # a window with 5 visible pixels: their sum × 9/5
    assert torch.isclose(y[0, 0, 0, 0], (x[0, 0, :3, :3] * mask[0, 0, :3, :3]).sum() * 9 / 5)
    # a window seeing nothing gives 0 and is masked onwards
    hidden = torch.ones(1, 1, 5, 5)
    hidden[..., :3, :3] = 0
    y, new_mask = layer(x, hidden)
    assert y[0, 0, 0, 0] == 0 and new_mask[0, 0, 0, 0] == 0 and new_mask[0, 0, 0, 1] == 1


def test_global_net_ignores_the_masked_patch():
    torch.manual_seed(0)
    net = GlobalNet()
    image = torch.rand(1, 3, 256, 256)
    mask = torch.ones(1, 1, 256, 256)
    mask[..., 100:133, 40:73] = 0
    other = image.clone()
    other[..., 100:133, 40:73] = torch.rand(1, 3, 33, 33)
    assert torch.equal(net(image, mask), net(other, mask))
    assert net(image, mask).shape == (1, 128)


def test_network_shapes_of_the_tables():
    assert LocalNet()(torch.rand(5, 3, 33, 33)).shape == (5, 128)  # Table 1
    assert DADHead(0.1)(torch.rand(5, 128), torch.rand(5, 128)).shape == (5, 2)  # Table 3


def test_idw_reproduces_a_hand_computed_map():
    values = torch.tensor([[1.0, 3.0]])
    points = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    grid = idw_map(values, points, 3, power=2)
    assert grid.shape == (1, 3, 3)
    assert grid[0, 0, 0] == 1 and grid[0, 0, 2] == 3  # a pixel on a point takes its value
    assert torch.isclose(grid[0, 0, 1], torch.tensor(2.0))  # equidistant: the mean
    assert torch.isclose(grid[0, 1, 0], torch.tensor(4 / 3))  # weights 1/1 and 1/5: (1 + 3/5) / (6/5)


def test_grid_is_uniform_raster_order():
    origins = grid_origins(256, 33, 20)
    assert origins.shape == (400, 2) and origins[0].tolist() == [0, 0] and origins[-1].tolist() == [223, 223]
    assert origins[1].tolist() == [0, 12]  # raster: the column moves first


def test_stains_change_only_part_of_each_patch():
    torch.manual_seed(0)
    patches = torch.full((8, 3, 33, 33), 0.5)
    changed = (random_stains(patches) != patches).any(1).float().mean((1, 2))
    assert (changed > 0).all() and (changed < 0.5).all()


def test_resume_is_bit_identical(tmp_path):
    train = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tiny = {"local_epochs": 2, "global_epochs": 2}  # one batch per epoch
    straight = create_model("glance", "tiny", **tiny).fit(train, workdir=tmp_path / "a")
    interrupted = create_model("glance", "tiny", **tiny)
    calls = []

    def dies_in_the_second_global_epoch(images):  # training_loss is the last stage's (after the distillation)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return type(interrupted).training_loss(interrupted, images)

    interrupted.training_loss = dies_in_the_second_global_epoch
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(train, workdir=tmp_path / "b")
    resumed = create_model("glance", "tiny", **tiny).fit(train, workdir=tmp_path / "b", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("side, grid", [(243, 4), (270, 5)])  # the smallest input, and one not a multiple of 32
def test_global_net_recomputing_only_the_hidden_patch_boxes_equals_masked_passes(side, grid):
    torch.manual_seed(0)
    net = GlobalNet().eval()
    image = torch.rand(3, side, side)
    origins = grid_origins(side, 33, grid)  # corners and edges included
    with torch.inference_mode():
        expected = net.masked_patch_features(image, origins, 33, incremental=False)  # one masked pass each
        got = net.masked_patch_features(image, origins, 33)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(expected[0], expected[-1])  # the hidden patch matters


def test_fitted_descriptors_are_standardised_for_the_global_stage():
    train = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = create_model("glance", "tiny", global_epochs=1).fit(train)
    assert not torch.equal(model.descriptor_std, torch.ones(128))  # fitted, not the constructed identity
    torch.manual_seed(0)
    patches = torch.cat([training_patches(train, 256, 33, whole_image=False)[0] for _ in range(8)])
    with torch.no_grad():
        features = model.local_features(patches)
    assert features.mean(0).abs().mean() < 0.5 and 0.5 < features.std(0).mean() < 1.5


def test_the_stages_run_in_order_each_with_its_own_loss(tmp_path, monkeypatch):
    """Distillation on general images, then on the category, then the Global-Net and DAD head (C.1)."""
    from PIL import Image

    from metaad.models import glance

    (tmp_path / "general").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (60 * i, 90, 120)).save(tmp_path / "general" / f"{i}.png")
    stages = []
    real = glance.train_model

    def recorded(model, data, **kwargs):
        trains = sorted({name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad})
        stages.append((type(model).__name__, model.training_settings().epochs, len(data), trains))
        return real(model, data, **kwargs)

    monkeypatch.setattr(glance, "train_model", recorded)
    model = create_model("glance", "tiny", pretrain_folders=(str(tmp_path / "general"),), pretrain_epochs=1,
                         local_epochs=2, global_epochs=1)
    model.fit(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)), workdir=tmp_path / "run")
    assert stages == [
        ("LocalDistillation", 1, 2, ["decoder", "local_net"]),
        ("LocalDistillation", 2, 4, ["decoder", "local_net"]),
        ("Glance", 1, 4, ["dad_head", "global_net"]),
    ]
    assert all((tmp_path / "run" / folder / "train_log.jsonl").is_file() for folder in ("pretrain", "local", "."))


def test_stains_on_grey_patches_are_grey_unless_asked_otherwise():
    from metaad.components.anomaly_synthesis import grey_images
    from metaad.models.glance import random_stains

    grey = torch.rand(16, 1, 33, 33).expand(16, 3, 33, 33)
    torch.manual_seed(0)
    stained = random_stains(grey, grey=grey_images(grey))
    torch.manual_seed(0)
    coloured = random_stains(grey)
    assert grey_images(stained).all() and (stained != grey).any()
    assert (~grey_images(coloured)).sum() >= 14
    assert ((stained != grey).any(1) == (coloured != grey).any(1)).float().mean() > 0.99  # the same ellipses
    assert create_model("glance", "paper").stain_colour == "as_is" and create_model("glance").stain_colour == "auto"


def test_dad_head_logits_are_leaky_as_table_3_or_linear():
    from metaad.models.glance import DADHead

    torch.manual_seed(0)
    leaky, linear = DADHead(1.0), DADHead(1.0, leaky_logits=False)
    linear.load_state_dict(leaky.state_dict())
    g, local = torch.randn(64, 128), torch.randn(64, 128)
    raw, squeezed = linear(g, local), leaky(g, local)
    assert (raw < 0).any()
    assert torch.allclose(squeezed, torch.where(raw < 0, 0.01 * raw, raw), atol=1e-6)


def test_one_dense_local_pass_equals_the_patches_own_passes():
    """On the 4 px step, each location of the Local-Net's dense map is exactly one 33 px patch's descriptor."""
    from metaad.models.glance import LOCAL_STRIDE

    torch.manual_seed(0)
    model = create_model("glance", "tiny", grid=6).eval()
    side = model.image_size
    full = torch.rand(2, 3, side, side)
    origins = grid_origins(side, 33, 6, LOCAL_STRIDE)
    assert (origins % 4 == 0).all() and origins.max() <= side - 33 and len(origins.unique(dim=0)) == 36
    rows, cols = origins[:, :1] + torch.arange(33), origins[:, 1:] + torch.arange(33)
    patches = full[:, :, rows[:, :, None], cols[:, None, :]].transpose(1, 2)
    with torch.no_grad():
        dense = model._grid_local_features(full, origins, patches)
        one_by_one = model.local_features(patches.reshape(-1, 3, 33, 33)).view(2, 36, -1)
    torch.testing.assert_close(dense, one_by_one, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs images of at least"):
        grid_origins(64, 33, 20, LOCAL_STRIDE)
