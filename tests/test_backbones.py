import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metaad.backbones import (
    BACKBONES,
    NORMALIZATION,
    Backbone,
    BackboneWeightsError,
    create_backbone,
    load_pretrained,
)
from metaad.data.transforms import normalize


def test_default_backbone_weights_classify_chelsea_as_a_cat():
    """The offline EfficientNet-Lite0 weights are right: scikit-image's chelsea is a cat (ImageNet 281-285)."""
    skimage_data = pytest.importorskip("skimage.data")
    model = load_pretrained("tf_efficientnet_lite0").eval()
    image = torch.from_numpy(np.ascontiguousarray(skimage_data.chelsea())).permute(2, 0, 1).float() / 255
    image = F.interpolate(image[None], size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = model(normalize(image)).argmax(dim=1).item()
    assert 281 <= top <= 285


def test_feature_maps_have_declared_channels_and_strides():
    backbone = create_backbone("tf_efficientnet_lite0", layers=(2, 3))
    maps = backbone(normalize(torch.zeros(1, 3, 64, 64), *backbone.normalization))
    assert backbone.channels == [40, 112] and backbone.reductions == [8, 16]
    assert [tuple(m.shape) for m in maps] == [(1, 40, 8, 8), (1, 112, 4, 4)]
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training  # frozen batch norm stays in eval mode


def test_batchnorm_folding_and_channels_last_memory_keep_the_features():
    backbone = create_backbone("tf_efficientnet_lite0", layers=(2, 3))
    unfolded = load_pretrained("tf_efficientnet_lite0", features_only=True, out_indices=(2, 3)).eval()
    images = normalize(torch.rand(2, 3, 96, 96), *backbone.normalization)
    with torch.no_grad():
        for folded_map, plain_map in zip(backbone(images), unfolded(images), strict=True):
            assert torch.allclose(folded_map, plain_map, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


def test_backbone_without_offline_weights_says_what_to_pass():
    with pytest.raises(BackboneWeightsError, match="weights=PATH"):
        create_backbone("resnet18", layers=(2, 3))


def test_local_weights_file_is_loaded(tmp_path):
    from metaad.io import save_tensors

    source = load_pretrained("resnet18", weights="none")
    torch.nn.init.constant_(source.conv1.weight, 0.5)
    save_tensors(tmp_path / "resnet18.safetensors", source.state_dict())
    backbone = create_backbone("resnet18", layers=(1, 2), weights=str(tmp_path / "resnet18.safetensors"))
    assert torch.allclose(backbone.model.conv1.weight, torch.tensor(0.5), rtol=1e-4)  # bn folded in
    with pytest.raises(BackboneWeightsError, match="not found"):
        create_backbone("resnet18", weights=str(tmp_path / "missing.pth"))


def test_unknown_backbone_is_rejected():
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("no_such_net")


def test_an_architecture_reads_no_weights_until_load_weights(monkeypatch):
    """Built, a backbone has seeded placeholder weights and the folded structure its pretrained weights take."""
    import metaad.backbones.registry as registry

    pretrained = create_backbone("tf_efficientnet_lite0", (2, 3)).state_dict()
    reads = []
    monkeypatch.setattr(registry, "load_pretrained", lambda *a, **k: reads.append(a) or load_pretrained(*a, **k))
    first, second = Backbone("tf_efficientnet_lite0", (2, 3)), Backbone("tf_efficientnet_lite0", (2, 3))
    assert not reads and first.state_dict().keys() == pretrained.keys()
    placeholder = second.state_dict()
    assert all(torch.equal(value, placeholder[key]) for key, value in first.state_dict().items())  # seeded
    first.load_weights()
    assert len(reads) == 1
    assert all(torch.equal(first.state_dict()[key], value) for key, value in pretrained.items())


def test_per_backbone_statistics_are_imagenets():
    from metaad.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    assert set(NORMALIZATION) == set(BACKBONES)
    assert all(stats == (IMAGENET_MEAN, IMAGENET_STD) for stats in NORMALIZATION.values())
