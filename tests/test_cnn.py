"""Image encoders: the shapes they promise, features that do not depend on the batch, a grid that keeps *where*,
ResNet-18 read through a hook, weights files that load or fail clearly, and errors that name bad images."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from einops import rearrange
from torch.testing import assert_close

from minivlm.cnn import CNN_PRESETS, CNNConfig, ColourBlindConv, ResNetTrunk, SmallCNN, build_encoder
from minivlm.data.shapes import COLOURS, Obj, Scene, render

TINY = CNN_PRESETS["tiny"]


@pytest.fixture(scope="module")
def resnet():
    """One randomly initialised ResNet-18 trunk in eval mode (BatchNorm then uses its running statistics)."""
    torch.manual_seed(0)
    return ResNetTrunk().eval()


@pytest.mark.parametrize("size", [32, 64])
def test_small_cnn_shapes(size):
    config = replace(TINY, image_size=size)
    encoder = SmallCNN(config)
    assert encoder.out_dim == config.widths[-1] * config.grid**2
    assert encoder(torch.rand(3, 3, size, size)).shape == (3, encoder.out_dim)


def test_batch_and_single_images_give_the_same_features():
    """GroupNorm normalises each image on its own: a batch, in training mode too, changes nothing."""
    encoder = SmallCNN(TINY).train()
    images = torch.rand(5, 3, 32, 32)
    batched = encoder(images)
    single = torch.cat([encoder(images[i : i + 1]) for i in range(5)])
    assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_features_keep_where_things_are():
    """The same object on the left or the right gives different features: no global pool erased the position."""
    encoder = SmallCNN(TINY).eval()
    images = torch.zeros(2, 3, 32, 32)
    images[0, :, 10:18, 2:10] = 1.0  # a white square on the left
    images[1, :, 10:18, 22:30] = 1.0  # ... on the right
    features = encoder(images)
    assert (features[0] - features[1]).abs().max() > 1e-3


def test_residual_blocks_start_as_the_identity():
    encoder = SmallCNN(TINY)
    blocks = [m for m in encoder.modules() if type(m).__name__ == "ResidualBlock"]
    assert len(blocks) == sum(TINY.blocks)
    x = torch.rand(2, blocks[0].f[0][0].in_channels, 8, 8)
    assert_close(blocks[0](x), x)  # x is non-negative, so relu(x + 0) = x


def test_stem_runs_at_full_resolution():
    """stem=C puts a stride-1 convolution with C channels before the first stage; F and the grid stay the same."""
    config = replace(TINY, stem=8)
    encoder = SmallCNN(config)
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert (convs[0].in_channels, convs[0].out_channels, convs[0].stride) == (3, 8, (1, 1))
    assert (convs[1].in_channels, convs[1].stride) == (8, (2, 2))  # the first stage now reads the stem
    assert len(convs) == len([m for m in SmallCNN(TINY).modules() if isinstance(m, torch.nn.Conv2d)]) + 1
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, encoder.out_dim) == (2, SmallCNN(TINY).out_dim)


def test_cpu_preset_size():
    """The course's encoder: 1.1 M parameters, F = (160 + 16) * 4 * 4 features, at 32 and 64 pixels alike."""
    for size in (32, 64):
        encoder = build_encoder("cnn", size)
        assert sum(p.numel() for p in encoder.parameters()) == pytest.approx(1.13e6, rel=0.01)
        assert encoder.out_dim == 2816


@pytest.mark.parametrize(
    "shape", [(2, 1, 32, 32), (2, 4, 32, 32), (2, 3, 64, 64), (2, 3, 32, 31), (3, 32, 32), (2, 32, 32, 3)]
)
def test_bad_images_are_errors(shape):
    with pytest.raises(ValueError, match=re.escape(f"expected images of shape (B, 3, 32, 32), got {shape}")):
        SmallCNN(TINY)(torch.rand(shape))


def _one_square_in_each_colour() -> torch.Tensor:
    """(5, 3, 32, 32): the same large square at the same place, once in each of the world's colours."""
    scenes = [Scene((Obj("square", colour, "large", 0.4, 0.55),), ()) for colour in COLOURS]
    return torch.stack([torch.from_numpy(render(s, 32)).permute(2, 0, 1).float() / 255 for s in scenes])


def test_colour_blind_conv_by_hand():
    """Each zero-sum kernel runs over R, G and B alone (edges replicated at the border); the largest |response| wins."""
    torch.manual_seed(0)
    conv = ColourBlindConv(4, stride=2)
    images = torch.rand(2, 3, 9, 9)
    kernel = conv.weight - conv.weight.mean(dim=(2, 3), keepdim=True)
    assert_close(kernel.sum(dim=(1, 2, 3)), torch.zeros(4))
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    per_channel = [torch.nn.functional.conv2d(padded[:, c : c + 1], kernel, stride=2).abs() for c in range(3)]
    assert_close(conv(images), torch.stack(per_channel).amax(0))
    upstream = torch.randn(2, 4, 5, 5)  # and the same gradient for the kernel, through the max over R, G and B
    (grad,) = torch.autograd.grad(conv(images), conv.weight, upstream)
    kernel = conv.weight - conv.weight.mean(dim=(2, 3), keepdim=True)
    per_channel = [torch.nn.functional.conv2d(padded[:, c : c + 1], kernel, stride=2).abs() for c in range(3)]
    assert_close(grad, torch.autograd.grad(torch.stack(per_channel).amax(0), conv.weight, upstream)[0])
    flat = torch.ones(5, 3, 8, 8) * torch.rand(5, 3, 1, 1)  # five images, each one flat colour
    assert_close(conv(flat), torch.zeros(5, 4, 4, 4))


def test_colour_path_leaves_the_cnn_colour_blind():
    """With `colour`, one square gives the same shape features in every colour; the colour path tells them apart."""
    torch.manual_seed(0)
    images = _one_square_in_each_colour()
    for stem in (0, 8):  # the colour-blind convolution is the stem, or the first stage's when there is none
        config = replace(TINY, stem=stem, colour=8)
        encoder = SmallCNN(config).eval()
        assert encoder.out_dim == (config.widths[-1] + 8) * config.grid**2
        with torch.no_grad():
            shape_features, features = encoder.layers(images), encoder(images)
        assert features.shape == (5, encoder.out_dim)
        assert_close(shape_features, shape_features[:1].expand_as(shape_features), atol=0.02, rtol=0.02)
        colours = rearrange(features, "b (cell c) -> b cell c", c=config.widths[-1] + 8)[..., -8:]  # the colour path's
        assert torch.cdist(colours.flatten(1), colours.flatten(1)).fill_diagonal_(1.0).min() > 0.01  # all differ
    with torch.no_grad():  # the plain CNN sees the colours in its first layer
        plain = SmallCNN(replace(TINY, stem=8)).eval().layers(images)
    assert (plain - plain[:1]).abs().amax() > 0.1


def test_colour_pool_summarises_each_cell_by_its_mean_or_its_maximum():
    """A cell's colour features: the mean of its pixels' (the default), or their maximum ("max"); shapes as before."""
    torch.manual_seed(0)
    images = _one_square_in_each_colour()
    mean, most = (SmallCNN(replace(TINY, colour=8, colour_pool=pool)).eval() for pool in ("mean", "max"))
    most.load_state_dict(mean.state_dict())  # the same weights: only the pooling differs
    with torch.no_grad():
        pixels = mean.colour(images)  # (B, 8, 32, 32): the colour path, pixel by pixel
        by_mean, by_max = (rearrange(m(images), "b (cell c) -> b cell c", c=TINY.widths[-1] + 8) for m in (mean, most))
    cells = rearrange(pixels, "b c (gh h) (gw w) -> b (gh gw) c (h w)", gh=TINY.grid, gw=TINY.grid)  # 8 x 8 per cell
    assert_close(by_mean[..., -8:], cells.mean(-1))
    assert_close(by_max[..., -8:], cells.amax(-1))
    assert torch.equal(by_mean[..., :-8], by_max[..., :-8])  # the shape features are not pooled differently
    assert (by_max[..., -8:] >= by_mean[..., -8:] - 1e-6).all() and not torch.equal(by_max, by_mean)
    with pytest.raises(ValueError, match="colour_pool must be one of"):
        CNNConfig(colour=8, colour_pool="median")


def test_integer_images_are_an_error():
    with pytest.raises(ValueError, match="expected float images"):
        SmallCNN(TINY)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_bad_configs_are_errors():
    with pytest.raises(ValueError, match="divisible by groups"):
        CNNConfig(widths=(12, 16), blocks=(1, 1))
    with pytest.raises(ValueError, match="stem=12 and colour=0 must be divisible by groups"):
        CNNConfig(stem=12)
    with pytest.raises(ValueError, match="colour=12 must be divisible by groups"):
        CNNConfig(colour=12)
    with pytest.raises(ValueError, match="stem must be >= 0"):
        CNNConfig(stem=-8)
    with pytest.raises(ValueError, match="colour must be >= 0"):
        CNNConfig(colour=-8)
    with pytest.raises(ValueError, match="same, non-zero number of stages"):
        CNNConfig(widths=(8, 16), blocks=(1,))
    with pytest.raises(ValueError, match="does not divide into a 4 x 4 grid"):
        CNNConfig(image_size=32, widths=(8, 16, 32, 64), blocks=(0, 0, 0, 0))  # 32 px / 2^4 = 2 cells


def test_resnet_hook_features_equal_avgpool_by_hand(resnet):
    images = torch.rand(2, 3, 32, 32)
    net = resnet.net
    with torch.no_grad():
        features = resnet(images)
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        expected = torch.flatten(net.avgpool(x), 1)
    assert features.shape == (2, 512) and resnet.out_dim == 512
    assert_close(features, expected)


def test_resnet_fc_is_unused_and_frozen(resnet):
    assert not any(p.requires_grad for p in resnet.net.fc.parameters())
    assert all(p.requires_grad for name, p in resnet.named_parameters() if not name.startswith("net.fc."))


def test_resnet_weights_round_trip(tmp_path, resnet):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.net.state_dict(), path)
    torch.manual_seed(1)  # a different random init, then overwritten by the file
    loaded = build_encoder("resnet18", weights=path).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), resnet(images))
    sized = ResNetTrunk(path, image_size=64)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 64, 64\), got \(1, 3, 32, 32\)"):
        sized(torch.rand(1, 3, 32, 32))


def test_resnet_bad_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ResNet-18 weights file at .*missing.pth"):
        ResNetTrunk(tmp_path / "missing.pth")
    path = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="is not a ResNet-18 state dict"):
        ResNetTrunk(path)


def test_resnet_checks_images(resnet):
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, S, S\), got \(2, 1, 32, 32\)"):
        resnet(torch.rand(2, 1, 32, 32))


def test_build_encoder():
    assert isinstance(build_encoder(TINY), SmallCNN)
    assert build_encoder("cnn", 64, preset="tiny").config.image_size == 64
    with pytest.raises(ValueError, match="unknown encoder 'vit'; choose one of"):
        build_encoder("vit")
    with pytest.raises(ValueError, match="unknown CNN preset 'huge'"):
        build_encoder("cnn", preset="huge")
    with pytest.raises(ValueError, match="weights files are for the 'resnet18' encoder"):
        build_encoder("cnn", weights="x.pth")
    with pytest.raises(ValueError, match="disagrees with the CNNConfig's image_size=32"):
        build_encoder(TINY, 64)
