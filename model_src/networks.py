"""The networks, and the classifier around them that owns normalisation and test-time
flipping, so that training, evaluation and serving cannot disagree about them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from contract import CLASSES

WeightAndBias = tuple[torch.Tensor, torch.Tensor]


class TutorialNet(nn.Module):
    """The network of PyTorch's CIFAR-10 tutorial (and of the seed notebook): same layers,
    same parameter names, so the seed's state_dict loads into it."""

    INPUT_CONV = "conv1"

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor, input_conv: WeightAndBias | None = None) -> torch.Tensor:
        """``input_conv`` replaces conv1's weight and bias (see Classifier.forward)."""
        # Functional calls with the layers' parameters rather than calls of the layers: at
        # serving's batch of one image, calling a module costs about as much as the work
        # of a small layer. ReLU after pooling equals the tutorial's pool(relu(x)) (both
        # are monotone) and touches a quarter of the values; in place, since nothing else
        # reads its input.
        w1, b1 = input_conv or (self.conv1.weight, self.conv1.bias)
        w2 = self.conv2.weight
        if x.is_contiguous(memory_format=torch.channels_last):
            # PyTorch's channels-last max-pool has a vectorised path for 8 channels but not
            # for 6, and this pool is a real share of a step: conv1 gets two all-zero filters
            # and conv2 zero weights for them. Same values, same gradients.
            w1, b1 = F.pad(w1, (0, 0, 0, 0, 0, 0, 0, 2)), F.pad(b1, (0, 2))
            w2 = F.pad(w2, (0, 0, 0, 0, 0, 2))
        x = F.max_pool2d(F.conv2d(x, w1, b1), 2).relu_()
        x = F.max_pool2d(F.conv2d(x, w2, self.conv2.bias), 2).relu_()
        x = F.linear(x.flatten(1), self.fc1.weight, self.fc1.bias).relu_()
        x = F.linear(x, self.fc2.weight, self.fc2.bias).relu_()
        return F.linear(x, self.fc3.weight, self.fc3.bias)


class BatchNorm(nn.BatchNorm2d):
    """airbench's BatchNorm: a learned shift but no learned scale (the next layer's weights
    scale anyway), a tiny epsilon, and running statistics that follow the last few batches
    (``momentum`` here is airbench's: the weight kept, 1 - PyTorch's)."""

    def __init__(self, channels: int, momentum: float, eps: float) -> None:
        super().__init__(channels, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad_(False)


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    """A 3x3 convolution that starts as (part) identity: airbench's dirac initialisation lets
    the signal through the untrained network unchanged."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    nn.init.dirac_(conv.weight.data[:min(c_in, c_out)])
    return conv


def _conv_block(c_in: int, c_out: int, momentum: float, eps: float) -> nn.Sequential:
    return nn.Sequential(
        _conv(c_in, c_out), nn.MaxPool2d(2), BatchNorm(c_out, momentum, eps), nn.GELU(),
        _conv(c_out, c_out), BatchNorm(c_out, momentum, eps), nn.GELU(),
    )


class AirbenchNet(nn.Module):
    """Keller Jordan's airbench94 network (arXiv:2404.00498): a frozen patch-whitening 2x2
    stem, three conv-pool-conv blocks with BatchNorm and GELU, global max pooling and a
    linear head whose logits are scaled by 1/9. ``widths`` are the blocks' channels:
    airbench94's (64, 256, 256); airbench93 narrows them to (64, 128, 128)."""

    INPUT_CONV = "stem"

    def __init__(self, widths: tuple[int, int, int] | list[int] = (64, 256, 256),
                 batchnorm_momentum: float = 0.6, batchnorm_eps: float = 1e-12) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, kernel_size=2, padding=0)
        nn.init.zeros_(self.stem.bias)
        momentum, eps = batchnorm_momentum, batchnorm_eps
        self.blocks = nn.Sequential(
            _conv_block(24, widths[0], momentum, eps),
            _conv_block(widths[0], widths[1], momentum, eps),
            _conv_block(widths[1], widths[2], momentum, eps),
        )
        self.head = nn.Linear(widths[2], len(CLASSES), bias=False)

    def prepare(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Patch-whitening stem (airbench): the 2x2 filters become the eigenvectors of the
        training patches' covariance, scaled by 1/sqrt(eigenvalue + eps), in +/- pairs, and
        stay frozen. Gradient descent then starts on decorrelated inputs and converges
        faster. ``images`` are normalised training images."""
        c, (h, w) = images.shape[1], self.stem.kernel_size
        patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3)
        patches = patches.reshape(-1, c * h * w).double()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, c, h, w)
        with torch.no_grad():
            self.stem.weight.copy_(torch.cat([filters, -filters]).float())
        self.stem.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor, input_conv: WeightAndBias | None = None) -> torch.Tensor:
        """``input_conv`` replaces the stem's weight and bias (see Classifier.forward)."""
        x = F.gelu(F.conv2d(x, *(input_conv or (self.stem.weight, self.stem.bias))))
        x = self.blocks(x)
        x = torch.amax(x, dim=(2, 3))
        return self.head(x) / 9


class Classifier(nn.Module):
    """Raw pixels in [0, 1] → logits. Normalisation and test-time flip averaging live here so
    training, evaluation and serving cannot disagree about them."""

    def __init__(self, body: nn.Module, mean: list[float], std: list[float], tta_level: int):
        super().__init__()
        self.body = body
        self.tta_level = tta_level  # see test_time_views
        # Channels-last suits oneDNN and training; PyTorch's native convolutions (serving
        # small networks, see "onednn_inference") run NCHW about twice as fast.
        self.channels_last = True
        # False once fold_normalisation() has moved the normalisation into the weights.
        self.normalise = True
        self.precision = "fp32"  # serving's arithmetic (model_fn sets it; training autocasts)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The normalisation happens inside the input convolution (normalising_input_conv):
        # normalising the pixels would cost two whole-batch passes, a tenth of a training
        # step; rescaling a few hundred weights costs nothing, and gradients flow through it.
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        input_conv = self.normalising_input_conv() if self.normalise else None
        if self.training or not self.tta_level:
            return self.body(x, input_conv)
        views, weights = test_time_views(x, self.tta_level)
        # All views in one batch: one call per layer instead of six (BatchNorm is in its
        # evaluation mode, so the views do not see each other).
        logits = self.body(torch.cat(views), input_conv).view(len(views), len(x), -1)
        return torch.einsum("v,vnc->nc", weights.to(logits.dtype).to(logits.device), logits)

    @property
    def input_layer(self) -> nn.Conv2d:
        """The body's first convolution (the one normalisation folds into)."""
        return getattr(self.body, self.body.INPUT_CONV)

    def normalising_input_conv(self) -> WeightAndBias:
        """The input convolution's weight and bias for raw pixels: conv(w, (x - m) / s) =
        conv(w / s, x) + b', with b' = b - sum(w * m / s). Exact because that convolution
        pads nothing (a padded border would be 0 in raw pixels, not in normalised ones)."""
        conv = self.input_layer
        if any(conv.padding) or conv.bias is None:
            raise ValueError("can only fold normalisation into an unpadded convolution with bias")
        scale, shift = 1 / self.std, -self.mean / self.std  # x_norm = x * scale + shift
        return conv.weight * scale, conv.bias + (conv.weight * shift).sum(dim=(1, 2, 3))

    @torch.no_grad()
    def fold_normalisation(self) -> None:
        """For serving: stores normalising_input_conv() as the input convolution's weights,
        so requests skip even that. The state_dict no longer holds trained weights
        afterwards: fold only a model that serves."""
        conv = self.input_layer
        weight, bias = self.normalising_input_conv()
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        self.normalise = False


def test_time_views(x: torch.Tensor, level: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """airbench's test-time augmentation: (views of the batch, the weight of each view's
    logits). Level 1: the image and its mirror image, half each. Level 2: half of that, and
    half the same pair shifted one pixel up-left and one pixel down-right (reflected borders).
    Reflecting commutes with the per-channel normalisation, so raw pixels can be shifted."""
    views = [x, x.flip(-1)]
    if level == 1:
        return views, torch.tensor([0.5, 0.5])
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    for shifted in (padded[..., :h, :w], padded[..., 2:, 2:]):
        views += [shifted, shifted.flip(-1)]
    return views, torch.tensor([0.25, 0.25, 0.125, 0.125, 0.125, 0.125])


@dataclass(frozen=True)
class Architecture:
    """A network and how it is served (its training recipe is in train.py)."""

    network: type[nn.Module]
    tta_level: int  # 0: none, 1: mirror, 2: mirror and translate (see test_time_views)
    # Whether serving on CPU uses oneDNN (channels-last) or PyTorch's native kernels (NCHW).
    # The tutorial network's convolutions are so small that oneDNN's per-call set-up costs
    # more than their arithmetic: it serves faster on the native kernels.
    onednn_inference: bool


ARCHITECTURES = {
    "tutorial": Architecture(TutorialNet, tta_level=0, onednn_inference=False),
    "airbench": Architecture(AirbenchNet, tta_level=2, onednn_inference=True),
}

# What an airbench model saved before its options were recorded in model_meta.json was
# built with: narrower blocks, PyTorch's BatchNorm epsilon, mirror-only test-time averaging.
LEGACY_OPTIONS = {"airbench": {"widths": [32, 64, 128], "batchnorm_eps": 1e-5, "tta_level": 1}}


def build_model(architecture: str, mean: list[float], std: list[float],
                options: dict | None = None) -> Classifier:
    """The named network inside its Classifier. ``options``: the network's keyword arguments
    (``widths``, ``batchnorm_eps``, ...) and ``tta_level``; unset ones take the defaults."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown model {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[architecture]
    network_options = dict(options or {})
    tta_level = network_options.pop("tta_level", spec.tta_level)
    return Classifier(spec.network(**network_options), mean, std, tta_level)
