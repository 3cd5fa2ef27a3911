"""Image encoders: a small CNN learned from scratch, and ResNet-18 as a trunk for (optionally) pretrained weights.

What it teaches: how an image becomes the feature vector a visual prefix is made from. Both encoders map
images (B, 3, H, W) to features (B, F); `out_dim` is F. The prefix mapper (`minivlm.prefix`) then turns F
numbers into P vectors in the language model's embedding space.

`SmallCNN` is a plain residual network in the manner of ResNet (He et al., 2016, "Deep Residual Learning
for Image Recognition"): stages that each halve the resolution with a stride-2 convolution and refine
it with residual blocks x + f(x). Before them, `CNNConfig.stem` puts a *narrow* stride-1 convolution at
full resolution (16 channels in the cpu preset; without it the first stage's stride-2 convolution is the
stem). At 32 pixels a small circle differs from a small square in a handful of edge pixels, which a first
layer computed at every other position sees less well: with the stem the course captioner names shapes
far more often, for a few percent of a training step (the README has the figures). A full-resolution
layer as wide as the first stage costs much more, because every channel is computed at 4 times as many
positions. Four choices are worth knowing:

- **GroupNorm, not BatchNorm** (Wu & He, 2018, "Group Normalization"). BatchNorm normalises with the
  statistics of the *batch*, so an image's features depend on which other images share its batch, and
  differ between training (batch statistics) and evaluation (running averages). GroupNorm normalises
  each image on its own, over groups of channels: a batch and its images one at a time give the same
  features, which the tests check.
- **Each residual block starts as the identity**: the gain of its last normalisation is set to zero
  (Goyal et al., 2017, "Accurate, Large Minibatch SGD"), so a deep stack begins as a shallow one.
- **Keep a grid, do not pool it away.** Classifiers end with a global average pool: one C-vector for
  the whole image, the mean over every position. That mean is the same wherever an object sits, so it
  cannot tell "a red circle to the left of a blue square" from "... to the right of ...". Shapes-world
  captions state exactly such relations (and sizes), so `SmallCNN` averages down to a small `grid` x
  `grid` map (4 x 4) and *flattens* it: F = C * grid². Each cell keeps its own slot in the feature
  vector, and the mapper learns a weight per cell, so *where* something is survives. (Adding a global
  pool as well would add nothing: the pool is a linear function of the flattened cells.)

- **Shape without colour** (`CNNConfig.colour`, optional). A CNN learns the colour–shape pairs it is
  shown: trained on scenes where no triangle is ever red, its first layers detect "a red edge" and "a
  green edge", and what it builds from them for "triangle" never fires on a red one; the course's
  captioner named a held-out pair (`shapes.HELD_OUT_PAIRS`) in one image of twenty. With `colour = C`
  the network is split in two, as an inductive bias rather than more data. Its first convolution is a
  `ColourBlindConv`: one zero-sum kernel run over R, G and B alone, the strongest |response| kept, so
  every layer above it sees edges of the same strength whatever their colour, and can learn shapes
  only. Colour comes in by a path of its own, 1x1 convolutions that see one pixel at a time (which colour,
  never what shape), averaged over the same grid cells, C numbers a cell beside the shape features.
  What an object looks like and what colour it is then reach the prefix apart, and a pair never seen
  in training is two things each seen many times.

`ResNetTrunk` wraps torchvision's ResNet-18 for the pretrained-encoder experiment, as ClipCap (Mokady et
al., 2021) starts from a pretrained image model. It never downloads: pass a weights file you have. Its
features are read with a *forward hook* on the `avgpool` layer, the standard way to take an intermediate
output from a model without editing it. It ends in a global pool (512 numbers), so it has the weakness
described above; that is the price of reusing a classifier.

Axis letters: B batch, C channels, H height, W width, F features.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["CNNConfig", "CNN_PRESETS", "ENCODERS", "COLOUR_POOLS", "check_images", "ColourBlindConv", "ResidualBlock",
           "SmallCNN", "ResNetTrunk", "build_encoder"]

ENCODERS = ("cnn", "resnet18")  # the names build_encoder knows
COLOUR_POOLS = ("mean", "max")  # CNNConfig.colour_pool: a cell's colour features, averaged or their maximum


@dataclass(frozen=True)
class CNNConfig:
    """The shape of a SmallCNN: image size, channels and residual blocks per stage, the grid it keeps."""

    image_size: int = 32  # H = W: the only image size the network accepts
    widths: tuple[int, ...] = (32, 64, 160)  # C of each stage; each halves H and W (the first by the stem)
    blocks: tuple[int, ...] = (1, 1, 2)  # residual blocks per stage, after its stride-2 convolution
    grid: int = 4  # the last map is averaged to grid x grid cells and flattened: F = widths[-1] * grid²
    groups: int = 8  # GroupNorm groups; every width must be divisible by it
    stem: int = 0  # C of a stride-1 convolution at full resolution before the first stage (0: none)
    colour: int = 0  # C of a separate colour path (0: none); with one, the layers above are colour-blind
    colour_pool: str = "mean"  # how a cell summarises the colour path: "mean" (how much of each colour feature) or
    # "max" (its strongest pixel: a small object's colour as strong as a large one's)

    def __post_init__(self):
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(
                f"widths {self.widths} and blocks {self.blocks} must name the same, non-zero number of stages"
            )
        if any(w % self.groups for w in (*self.widths, self.stem, self.colour)):
            raise ValueError(
                f"every width in {self.widths}, stem={self.stem} and colour={self.colour} must be divisible by "
                f"groups={self.groups}"
            )
        for name in ("stem", "colour"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 channels, got {getattr(self, name)}")
        if self.colour_pool not in COLOUR_POOLS:
            raise ValueError(f"colour_pool must be one of {COLOUR_POOLS}, got {self.colour_pool!r}")
        if min(self.blocks) < 0:
            raise ValueError(f"blocks per stage must be >= 0, got {self.blocks}")
        if self.final_size < self.grid or self.final_size % self.grid:
            raise ValueError(
                f"{len(self.widths)} stride-2 stages take {self.image_size}-pixel images to a {self.final_size} x "
                f"{self.final_size} map, which does not divide into a {self.grid} x {self.grid} grid; "
                f"change image_size, the number of stages or grid"
            )

    @property
    def final_size(self) -> int:
        """Side of the last stage's feature map, in cells."""
        return self.image_size // 2 ** len(self.widths)

    @property
    def cells(self) -> int:
        """N, the grid's cells: F is N cells of out_dim / N features (`minivlm.prefix.GridMapper`)."""
        return self.grid**2

    @property
    def out_dim(self) -> int:
        """F, the length of each image's feature vector."""
        return (self.widths[-1] + self.colour) * self.grid**2


# "tiny": for tests (about 30 thousand parameters). "cpu": the course's encoder, 1.1 M parameters at
# any image size, trained from scratch at several hundred 32-pixel images a second on a CPU; its shape
# layers are colour-blind and colour has a path of its own, for the held-out colour–shape pairs.
CNN_PRESETS: dict[str, CNNConfig] = {
    "tiny": CNNConfig(widths=(8, 16, 32), blocks=(0, 1, 1)),
    "cpu": CNNConfig(stem=16, colour=16),
}


def check_images(images: Tensor, image_size: int | None) -> None:
    """Raise a ValueError that names the problem unless images is (B, 3, S, S) with S = image_size (any S if None)."""
    s = image_size if image_size is not None else "S"
    ok = images.ndim == 4 and images.shape[1] == 3
    if image_size is not None:
        ok = ok and images.shape[2] == images.shape[3] == image_size
    if not ok:
        raise ValueError(f"expected images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images (in [0, 1], or ImageNet-normalised), got dtype {images.dtype}")


def _conv_norm(c_in: int, c_out: int, groups: int, stride: int = 1, colour_blind: bool = False) -> nn.Sequential:
    """3x3 convolution (no bias: the norm that follows has one) then GroupNorm; colour_blind: a ColourBlindConv."""
    conv = ColourBlindConv(c_out, stride) if colour_blind else nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
    return nn.Sequential(conv, nn.GroupNorm(groups, c_out))


class ColourBlindConv(nn.Module):
    """A 3x3 convolution that sees edges but not their colour: one kernel per channel of RGB, the strongest wins.

    The same single-channel kernel runs over R, G and B; each kernel sums to zero, so a flat region (any
    colour) gives 0 and only edges respond; the output is the largest |response| of the three. An edge
    between a shape and the grey background then gives about the same response whatever the shape's
    colour (the strongest of its three channel contrasts), so nothing after it can tell colours apart.
    """

    def __init__(self, c_out: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(c_out, 1, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv2d's own initialisation

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> (B, C, H / stride, W / stride)."""
        kernel = self.weight - self.weight.mean(dim=(2, 3), keepdim=True)  # each sums to 0: blind to flat colour
        x = F.pad(rearrange(images, "b rgb h w -> (b rgb) 1 h w"), (1, 1, 1, 1), mode="replicate")  # no border edge
        x = F.conv2d(x, kernel, stride=self.stride)  # (B * 3, C, H', W')
        # the strongest |response| of R, G and B, a max over a view: einops' reduce first copied x with rgb last
        # (about 3 ms of a 0.2 s cpu-preset training step), for the same values and gradients, ties included
        return rearrange(x.abs(), "(b rgb) c h w -> b rgb c h w", rgb=3).amax(dim=1)


class ResidualBlock(nn.Module):
    """x + f(x) with f = conv-norm-ReLU-conv-norm, then ReLU: ResNet's basic block, starting as the identity."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        c, g = channels, groups
        self.f = nn.Sequential(_conv_norm(c, c, g), nn.ReLU(), _conv_norm(c, c, g))
        nn.init.zeros_(self.f[-1][1].weight)  # the last GroupNorm's gain: f(x) = 0 at the start

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.f(x))  # (B, C, H, W)


class SmallCNN(nn.Module):
    """A residual CNN from scratch whose features keep a coarse grid of *where* things are: (B, 3, S, S) -> (B, F)."""

    def __init__(self, config: CNNConfig = CNN_PRESETS["cpu"]):
        super().__init__()
        self.config = config
        self.out_dim = config.out_dim  # F
        self.cells = config.cells  # N
        g = config.groups
        c_in = 3  # without `stem`, the first stage's stride-2 convolution is the stem
        layers: list[nn.Module] = []
        if config.stem:  # a narrow convolution at full resolution: edges and corners before any downsampling
            layers += [_conv_norm(c_in, config.stem, g, colour_blind=bool(config.colour)), nn.ReLU()]
            c_in = config.stem
        for i, (c, n) in enumerate(zip(config.widths, config.blocks)):
            blind = i == 0 and not config.stem and config.colour > 0  # the first convolution is the colour-blind one
            layers += [_conv_norm(c_in, c, g, stride=2, colour_blind=blind), nn.ReLU()]  # halve H and W: no residual
            layers += [ResidualBlock(c, g) for _ in range(n)]  # same shape in and out: residual
            c_in = c
        self.layers = nn.Sequential(*layers)
        c = config.colour  # per pixel, 1x1 convolutions: which colour, never what shape
        self.colour = nn.Sequential(nn.Conv2d(3, c, 1, bias=False), nn.GroupNorm(g, c), nn.ReLU(),
                                    nn.Conv2d(c, c, 1, bias=False), nn.GroupNorm(g, c), nn.ReLU()) if c else None

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) -> features (B, F), F = (C + colour) * grid² (cell row, cell column, channel)."""
        check_images(images, self.config.image_size)
        x = self.layers(images)  # (B, C, S / 2^stages, S / 2^stages)
        x = F.adaptive_avg_pool2d(x, self.config.grid)  # (B, C, grid, grid): each cell the mean of its region
        if self.colour is not None:  # each cell's colour features (mean or maximum), beside its shape features
            pool = F.adaptive_max_pool2d if self.config.colour_pool == "max" else F.adaptive_avg_pool2d
            x = torch.cat([x, pool(self.colour(images), self.config.grid)], dim=1)
        return rearrange(x, "b c h w -> b (h w c)")  # (B, F)


class ResNetTrunk(nn.Module):
    """torchvision's ResNet-18 read at its global pool: (B, 3, H, W) -> (B, 512); weights only from a file you give.

    Pretrained ImageNet weights expect ImageNet-normalised images (`ShapesCaptions(world, normalize=True)`
    or `minivlm.data.folders.image_transform(S, normalize=True)`). The classifier `fc` stays in the model,
    so a full torchvision state dict (e.g. resnet18-f37072fd.pth) loads as it is, but it is never used:
    its parameters are frozen. BatchNorm is kept as torchvision has it, so features depend on the batch
    in training mode.
    """

    def __init__(self, weights: str | Path | None = None, image_size: int | None = None):
        super().__init__()
        from torchvision.models import resnet18

        path = None if weights is None else self._weights_file(weights)  # a missing file fails before any work
        self.net = resnet18(weights=None)  # random init; never touches the network
        self.image_size = image_size  # if set, the only image size accepted; ResNet itself takes any >= 32
        self.out_dim = self.net.fc.in_features  # F = 512
        self.cells = 1  # the global pool: one cell
        if path is not None:
            self.load_weights(path)
        self.net.fc.requires_grad_(False)  # unused: the features are read before it
        self._features: Tensor | None = None
        self.net.avgpool.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        """The forward hook: PyTorch calls it with avgpool's output (B, 512, 1, 1) each time avgpool runs."""
        self._features = output

    @staticmethod
    def _weights_file(weights: str | Path) -> Path:
        """The weights file as a Path, or a FileNotFoundError that says what file is wanted."""
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"no ResNet-18 weights file at {path}; give a state dict saved with "
                f"torch.save(torchvision.models.resnet18().state_dict(), path), such as torchvision's "
                f"resnet18-f37072fd.pth, or weights=None for a randomly initialised ResNet-18"
            )
        return path

    def load_weights(self, weights: str | Path) -> None:
        """Load a ResNet-18 state dict saved with torch.save, with errors that say what is wrong."""
        path = self._weights_file(weights)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a ResNet-18 state dict")
        try:
            self.net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path} is not a ResNet-18 state dict: {err}") from err

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> features (B, 512), the global average of the last stage."""
        check_images(images, self.image_size)
        self._features = None
        self.net(images)  # runs everything; the hook keeps avgpool's output, fc's is thrown away
        features, self._features = self._features, None
        return rearrange(features, "b c 1 1 -> b c")  # (B, F)


def build_encoder(
    name_or_config: str | CNNConfig = "cnn",
    image_size: int | None = None,
    *,
    preset: str = "cpu",
    weights: str | Path | None = None,
) -> nn.Module:
    """An encoder by name, "cnn" (a SmallCNN preset at image_size) or "resnet18"; or a SmallCNN of a CNNConfig."""
    if isinstance(name_or_config, CNNConfig):
        if image_size is not None and image_size != name_or_config.image_size:
            raise ValueError(
                f"image_size={image_size} disagrees with the CNNConfig's image_size={name_or_config.image_size}"
            )
        name_or_config, config = "cnn", name_or_config
    elif name_or_config == "cnn":
        if preset not in CNN_PRESETS:
            raise ValueError(f"unknown CNN preset {preset!r}; choose one of {sorted(CNN_PRESETS)}")
        config = CNN_PRESETS[preset] if image_size is None else replace(CNN_PRESETS[preset], image_size=image_size)
    elif name_or_config == "resnet18":
        return ResNetTrunk(weights, image_size=image_size)
    else:
        raise ValueError(f"unknown encoder {name_or_config!r}; choose one of {ENCODERS}")
    if weights is not None:
        raise ValueError("weights files are for the 'resnet18' encoder; a SmallCNN ('cnn') learns from scratch")
    return SmallCNN(config)
