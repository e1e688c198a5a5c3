"""CIFAR-10 CNN: the SageMaker training entry script and its inference handlers.

This file is shipped on its own as the SageMaker ``source_dir`` entry point, so it imports only
torch, numpy and the standard library (what the PyTorch Deep Learning Containers carry).

Training (``python cifar10.py --epochs 2 ...``) follows the SageMaker training contract: data
from ``SM_CHANNEL_TRAINING``, the model into ``SM_MODEL_DIR``, metrics into
``SM_OUTPUT_DATA_DIR``, a failure reason into ``SM_OUTPUT_DIR/failure``. With several hosts in
``SM_HOSTS`` it trains data-parallel with ``torch.distributed`` (gloo on CPU, nccl on GPU).

Inference follows the SageMaker PyTorch serving contract: ``model_fn``, ``input_fn``,
``predict_fn`` and ``output_fn``. The model takes float pixels in [0, 1] shaped N x 3 x 32 x 32
(what torchvision's ``ToTensor`` gives) and answers N x 10 logits; normalisation lives inside
the model, so clients never need to know the training statistics.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import math
import os
import pickle
import platform
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (3, 32, 32)
WEIGHTS_FILE = "model.pth"
META_FILE = "model_meta.json"
METRICS_FILE = "metrics.json"

# ---------------------------------------------------------------------------------------------
# Data: any correctly formatted CIFAR-10 "python version" batch directory, read into tensors.
# ---------------------------------------------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batch files while refusing every global except numpy's array rebuild.

    CIFAR-10's python format is a pickle; a plain ``pickle.load`` would run arbitrary code from
    a tampered file. The batches only need dicts, lists, bytes and numpy arrays.
    """

    _ALLOWED = frozenset({
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file → (images uint8 N x 3 x 32 x 32, labels int64 N)."""
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise ValueError(f"{path}: not a CIFAR-10 python batch file ({e})") from e
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: expected a dict, found {type(entry).__name__}")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: missing the 'data' or 'labels' entry")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 N x 3072, found {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f"{path}: labels must lie in 0..{len(CLASSES) - 1}")
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


def find_batch_dir(data_dir: Path) -> Path:
    """The directory holding ``data_batch_*`` and ``test_batch``: ``data_dir`` or one below it."""
    candidates = [data_dir, data_dir / "cifar-10-batches-py", *sorted(data_dir.glob("*/"))]
    for candidate in candidates:
        if (candidate / "test_batch").is_file() and any(candidate.glob("data_batch_*")):
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-10 batches (data_batch_* and test_batch) in {data_dir} or its subdirectories"
    )


def load_cifar10(data_dir: str | Path) -> dict[str, torch.Tensor]:
    """Train and test splits as uint8 image tensors N x 3 x 32 x 32 and int64 label tensors.

    The images are stored channels-last, the layout the networks compute in: a batch
    gathered from them needs no conversion (converting each batch cost ~0.3 ms of a ~6 ms
    training step on CPU)."""
    batch_dir = find_batch_dir(Path(data_dir))
    train = [read_batch(p) for p in sorted(batch_dir.glob("data_batch_*"))]
    test_x, test_y = read_batch(batch_dir / "test_batch")
    return {
        "train_x": stack_channels_last([x for x, _ in train]),
        "train_y": torch.from_numpy(np.concatenate([y for _, y in train])),
        "test_x": stack_channels_last([test_x]),
        "test_y": torch.from_numpy(test_y),
    }


def stack_channels_last(images: list[np.ndarray]) -> torch.Tensor:
    """N x 3 x 32 x 32 uint8 arrays → one channels-last tensor, in a single copy."""
    out = torch.empty((sum(map(len, images)), *IMAGE_SHAPE), dtype=torch.uint8,
                      memory_format=torch.channels_last)
    start = 0
    for part in images:
        out[start:start + len(part)].copy_(torch.from_numpy(part))
        start += len(part)
    return out


def channel_stats(images: torch.Tensor, sample: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale, from 256-bin histograms
    of an evenly spaced sample of at most ``sample`` images (on CIFAR-10 within 1e-3 of the
    full set's values, at a fifth of the cost)."""
    images = images[:: max(1, len(images) // sample)]
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1).long(), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / (n - 1)
        means.append(mean.item())
        stds.append(var.sqrt().item())
    return means, stds


def random_crop_flip(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Batch augmentation on tensors: random translation by up to ``pad`` pixels and
    horizontal flips, with reflected borders. No per-sample Python work."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    cropped = padded[batch, channels, rows, cols]
    flip = torch.rand(n, generator=generator, device="cpu").to(images.device) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(-1), cropped)


# JPEG's standard quantisation tables (ITU T.81, Annex K), for quality 50.
_JPEG_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99],
], dtype=torch.float32)
_JPEG_CHROMA = torch.full((8, 8), 99.0)
_JPEG_CHROMA[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99],
                                     [47, 66, 99, 99]], dtype=torch.float32)
_DCT = torch.tensor([[math.sqrt((1 if k == 0 else 2) / 8) * math.cos((2 * n + 1) * k * math.pi / 16)
                      for n in range(8)] for k in range(8)], dtype=torch.float32)
_RGB_TO_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],
                              [0.5, -0.418688, -0.081312]])


def jpeg_compress(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """What a JPEG encode/decode round trip does to float images in [0, 1], on tensors:
    4:2:0 chroma subsampling and 8x8 DCT quantisation at the given per-image ``quality``.

    Images met in practice (and most of a mirror's test split) were JPEG-compressed once;
    training on such copies too keeps accuracy from dropping on them.
    """
    device = images.device
    n, _, h, w = images.shape
    ycc = torch.einsum("ij,njhw->nihw", _RGB_TO_YCBCR.to(device), images * 255)
    ycc[:, 1:] += 128
    luma, chroma = ycc[:, :1], F.avg_pool2d(ycc[:, 1:], 2)
    # libjpeg's quality scaling of the tables
    q = quality.float().clamp(1, 100).to(device)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q).view(n, 1, 1, 1, 1, 1) / 100
    dct = _DCT.to(device)

    def quantise(channels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        c, hh, ww = channels.shape[1:]
        blocks = (channels - 128).view(n, c, hh // 8, 8, ww // 8, 8).transpose(3, 4)
        coefficients = dct @ blocks @ dct.T
        step = (table.to(device) * scale).floor().clamp(min=1)
        coefficients = torch.round(coefficients / step) * step
        blocks = dct.T @ coefficients @ dct
        return blocks.transpose(3, 4).reshape(n, c, hh, ww) + 128

    luma = quantise(luma, _JPEG_LUMA)
    chroma = F.interpolate(quantise(chroma, _JPEG_CHROMA), size=(h, w), mode="bilinear",
                           align_corners=False)
    ycc = torch.cat([luma, chroma - 128], dim=1)
    rgb = torch.einsum("ij,njhw->nihw", torch.linalg.inv(_RGB_TO_YCBCR).to(device), ycc)
    return (rgb / 255).clamp(0, 1)


def random_jpeg(images: torch.Tensor, fraction: float, generator: torch.Generator,
                quality_range: tuple[int, int] = (40, 95)) -> torch.Tensor:
    """JPEG-compresses a random ``fraction`` of the batch at random qualities."""
    n = len(images)
    chosen = torch.rand(n, generator=generator) < fraction
    if not chosen.any():
        return images
    quality = torch.randint(quality_range[0], quality_range[1] + 1, (int(chosen.sum()),),
                            generator=generator)
    out = images.clone()
    index = chosen.nonzero().squeeze(1).to(images.device)
    out[index] = jpeg_compress(images[index].float(), quality).to(images.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


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
            # PyTorch's channels-last max-pool has no vectorised path for 6 channels and runs
            # ~2.5x slower than for 8 (a tenth of a training step): conv1 gets two all-zero
            # filters and conv2 zero weights for them. Same values, same gradients.
            w1, b1 = F.pad(w1, (0, 0, 0, 0, 0, 0, 0, 2)), F.pad(b1, (0, 2))
            w2 = F.pad(w2, (0, 0, 0, 0, 0, 2))
        x = F.max_pool2d(F.conv2d(x, w1, b1), 2).relu_()
        x = F.max_pool2d(F.conv2d(x, w2, self.conv2.bias), 2).relu_()
        x = F.linear(x.flatten(1), self.fc1.weight, self.fc1.bias).relu_()
        x = F.linear(x, self.fc2.weight, self.fc2.bias).relu_()
        return F.linear(x, self.fc3.weight, self.fc3.bias)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(c_out),
        nn.GELU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.GELU(),
    )


class AirbenchNet(nn.Module):
    """A small VGG-style network after Keller Jordan's airbench: a patch stem, three
    conv-pool-conv blocks, global max pooling and a linear head with scaled-down logits."""

    INPUT_CONV = "stem"

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, kernel_size=2, padding=0)
        self.blocks = nn.Sequential(
            _conv_block(24, widths[0]), _conv_block(widths[0], widths[1]),
            _conv_block(widths[1], widths[2]),
        )
        self.head = nn.Linear(widths[2], len(CLASSES), bias=False)

    def prepare(self, images: torch.Tensor, eps: float = 5e-2) -> None:
        """Patch-whitening stem (airbench): the 2x2 filters become the eigenvectors of the
        training patches' covariance, scaled by 1/sqrt(eigenvalue), in +/- pairs, and stay
        frozen. Gradient descent then starts on decorrelated inputs and converges faster.
        ``eps`` damps the smallest-variance (high-frequency) directions: airbench's 5e-4
        amplifies them enough to make the network fragile on JPEG-compressed images.
        ``images`` are normalised training images."""
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

    def __init__(self, body: nn.Module, mean: list[float], std: list[float], flip_tta: bool):
        super().__init__()
        self.body = body
        self.flip_tta = flip_tta
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
        logits = self.body(x, input_conv)
        if self.flip_tta and not self.training:
            logits = (logits + self.body(x.flip(-1), input_conv)) / 2
        return logits

    def normalising_input_conv(self) -> WeightAndBias:
        """The input convolution's weight and bias for raw pixels: conv(w, (x - m) / s) =
        conv(w / s, x) + b', with b' = b - sum(w * m / s). Exact because that convolution
        pads nothing (a padded border would be 0 in raw pixels, not in normalised ones)."""
        conv = getattr(self.body, self.body.INPUT_CONV)
        if any(conv.padding) or conv.bias is None:
            raise ValueError("can only fold normalisation into an unpadded convolution with bias")
        scale, shift = 1 / self.std, -self.mean / self.std  # x_norm = x * scale + shift
        return conv.weight * scale, conv.bias + (conv.weight * shift).sum(dim=(1, 2, 3))

    @torch.no_grad()
    def fold_normalisation(self) -> None:
        """For serving: stores normalising_input_conv() as the input convolution's weights,
        so requests skip even that. The state_dict no longer holds trained weights
        afterwards: fold only a model that serves."""
        conv = getattr(self.body, self.body.INPUT_CONV)
        weight, bias = self.normalising_input_conv()
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        self.normalise = False


# Each preset is a network plus the recipe that trains it well. Command-line hyperparameters
# override the recipe's values.
PRESETS: dict[str, dict] = {
    "tutorial": {
        "network": TutorialNet,
        # A pass and a quarter beats the seed's 54% on every seed tried, in bf16 and in fp32
        # alike. Label smoothing and the longer warm-up keep this normalisation-free network
        # from the occasional diverging run of a higher learning rate.
        "epochs": 1.25, "batch_size": 128, "lr": 0.05, "momentum": 0.95, "nesterov": True,
        "weight_decay": 0.0, "label_smoothing": 0.2, "warmup_fraction": 0.2,
        "augment_pad": 0, "jpeg_fraction": 0.0, "flip_tta": False,
        # Its convolutions are so small that oneDNN's per-call set-up (~60 µs each) costs
        # more than the arithmetic: serving answers twice as fast with the native kernels.
        "onednn_inference": False,
    },
    "airbench": {
        "network": AirbenchNet,
        # 11 passes stay above 85% in fp32 too, and fit 10 minutes on 2 cores without native
        # bf16, where each step costs about 1.7 times as much.
        "epochs": 11, "batch_size": 512, "lr": 0.2, "momentum": 0.9, "nesterov": True,
        "weight_decay": 5e-4, "label_smoothing": 0.2, "warmup_fraction": 0.2,
        "augment_pad": 2, "jpeg_fraction": 0.5, "flip_tta": True,
        "onednn_inference": True,
    },
}


def build_model(architecture: str, mean: list[float], std: list[float]) -> Classifier:
    if architecture not in PRESETS:
        raise ValueError(f"unknown model {architecture!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[architecture]
    return Classifier(preset["network"](), mean, std, preset["flip_tta"])


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def passes(text: str) -> int | float:
    """``--epochs``: "2" -> 2, "1.5" -> 1.5 (metrics and logs then say 2 epochs, not 2.0)."""
    value = float(text)
    return int(value) if value.is_integer() else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    hosts = json.loads(env.get("SM_HOSTS", '["localhost"]'))
    default_gpus = torch.cuda.device_count()
    p = argparse.ArgumentParser(
        description="Train a CIFAR-10 CNN (SageMaker training entry script). Hyperparameters "
        "left unset take the chosen model preset's values.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="tutorial", choices=sorted(PRESETS), help="network preset")
    p.add_argument("--epochs", type=passes,
                   help="passes over the training set; a fraction ends the last one early "
                        "(1.5: one pass, then half of a second)")
    p.add_argument("--batch-size", "--batch_size", type=int, help="images per step per host")
    p.add_argument("--lr", type=float, help="peak learning rate (SGD)")
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, order, augmentation)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="arithmetic of the forward pass: bf16 autocast or fp32; auto picks bf16 "
                        "only where the hardware has it natively")
    p.add_argument("--workers", type=int, default=0,
                   help="accepted for compatibility; data is already in memory as tensors")
    p.add_argument("--dist-backend", "--dist_backend", default="auto",
                   choices=["auto", "gloo", "nccl"], help="torch.distributed backend")
    p.add_argument("--model-dir", "--model_dir", default=env.get("SM_MODEL_DIR", "model"))
    p.add_argument("--data-dir", "--data_dir", default=env.get("SM_CHANNEL_TRAINING", "data"))
    p.add_argument("--output-data-dir", "--output_data_dir", default=env.get("SM_OUTPUT_DATA_DIR"),
                   help="where metrics.json goes (default: output/data beside the model dir)")
    p.add_argument("--hosts", type=json.loads, default=hosts, help="JSON list of host names")
    p.add_argument("--current-host", "--current_host", default=env.get("SM_CURRENT_HOST", hosts[0]))
    p.add_argument("--num-gpus", "--num_gpus", type=int,
                   default=int(env.get("SM_NUM_GPUS", default_gpus)))
    args = p.parse_args(argv)
    if args.current_host not in args.hosts:
        p.error(f"--current-host {args.current_host!r} is not in --hosts {args.hosts}")
    recipe = PRESETS[args.model]
    for key in ("epochs", "batch_size", "lr", "momentum"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    if not 0 < args.epochs < math.inf or args.batch_size < 1 or args.lr <= 0:
        p.error("--epochs must be > 0, --batch-size >= 1 and --lr > 0")
    if args.output_data_dir is None:
        args.output_data_dir = str(Path(args.model_dir).parent / "output" / "data")
    return args


PRECISIONS = ("auto", "fp32", "bf16")
# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) under which bf16 is still computed natively.
_NATIVE_BF16_ISA_MARKERS = ("BF16", "AMX", "AVX512_CORE_FP16", "AVX10", "ALL", "DEFAULT")


def cpu_bf16_support() -> tuple[bool, str]:
    """(native, why): whether this CPU computes bf16 natively (AVX-512 BF16 or AMX on x86,
    the BF16 extension on Arm), as torch and its oneDNN report it. Elsewhere oneDNN emulates
    bf16 with fp32 arithmetic plus conversions, several times slower than fp32 itself."""
    capability = torch.backends.cpu.get_cpu_capability()
    onednn_bf16 = torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if platform.system() == "Darwin":  # Apple's BF16 extension: not measured yet, so no bf16
        return False, "cpu: macOS, bf16 not measured there (fp32)"
    if platform.machine().lower() in ("aarch64", "arm64"):
        return (True, "cpu: Arm BF16 extension") if onednn_bf16 else \
            (False, f"cpu: no native bf16 ({capability}, no BF16 extension)")
    limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "")
    if limit and not any(marker in limit.upper() for marker in _NATIVE_BF16_ISA_MARKERS):
        return False, f"cpu: no native bf16 (oneDNN limited to {limit} by ONEDNN_MAX_CPU_ISA)"
    cpu = torch.cpu
    amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    if onednn_bf16 and (amx or avx512_bf16):
        return True, "cpu: native bf16 (" + ("AMX" if amx else "AVX512-BF16") + ")"
    without = " without BF16" if "AVX512" in capability else ""
    return False, f"cpu: no native bf16 ({capability}{without})"


def choose_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(precision, why) for ``--precision``: ``auto`` takes bf16 only where it is native (a
    CUDA device with bf16, or a CPU with AVX-512 BF16 / AMX), fp32 everywhere else."""
    if requested != "auto":
        return requested, f"--precision {requested}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"cuda: {name} has native bf16"
        return "fp32", f"cuda: {name} has no native bf16"
    native, why = cpu_bf16_support()
    return ("bf16" if native else "fp32"), why


def log_metrics(**metrics: float) -> None:
    """One line of ``name=value;`` pairs, scraped by SageMaker metric-definition regexes
    such as ``train_loss=([0-9.]+);``."""
    print(" ".join(f"{name}={value if isinstance(value, int) else f'{value:.6f}'};"
                   for name, value in metrics.items()), flush=True)


def init_distributed(args: argparse.Namespace, device: torch.device) -> tuple[int, int]:
    """Joins the process group when there are several hosts; returns (rank, world size)."""
    world_size = len(args.hosts)
    rank = args.hosts.index(args.current_host)
    if world_size == 1:
        return 0, 1
    backend = args.dist_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    master_addr = os.environ.get("MASTER_ADDR", args.hosts[0])
    master_port = os.environ.get("MASTER_PORT", "29500")
    print(f"joining {backend} process group as rank {rank}/{world_size} "
          f"via {master_addr}:{master_port}", flush=True)
    dist.init_process_group(
        backend=backend, init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=10),
    )
    return rank, world_size


class SGD:
    """SGD with (Nesterov) momentum and decoupled-from-biases weight decay, written out.

    The same update as ``torch.optim.SGD`` (buffer = momentum * buffer + gradient), without
    its constructor, which imports torch._dynamo: a second, a fifth of a default training run.
    Weight decay applies to weight matrices and kernels only, not to biases and norms.
    """

    def __init__(self, params: list[torch.Tensor], momentum: float, nesterov: bool,
                 weight_decay: float) -> None:
        self.params = params
        self.buffers = [torch.zeros_like(p) for p in params]
        self.decays = [weight_decay if p.ndim > 1 else 0.0 for p in params]
        self.momentum, self.nesterov = momentum, nesterov and momentum > 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """Applies the gradients at learning rate ``lr``, then clears them."""
        for param, buffer, decay in zip(self.params, self.buffers, self.decays, strict=True):
            grad = param.grad
            if decay:
                grad = grad.add(param, alpha=decay)
            buffer.mul_(self.momentum).add_(grad)
            update = grad.add(buffer, alpha=self.momentum) if self.nesterov else buffer
            param.add_(update, alpha=-lr)
            param.grad = None


def lr_at(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Learning-rate multiplier: linear warm-up, then linear decay to zero (one cycle)."""
    warmup = int(total_steps * warmup_fraction)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             device: torch.device, bf16: bool, batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on a uint8 image tensor."""
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(images), batch_size):
            x = to_model_input(images[start:start + batch_size], device)
            y = labels[start:start + batch_size].to(device)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    model.train()
    return loss_sum / len(images), correct / len(images)


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images → float pixels in [0, 1]."""
    return images.to(device, non_blocking=True).float().div_(255)


def weights_digest(model: nn.Module) -> str:
    """sha256 over the parameters: equal on every rank after data-parallel steps. (Buffers
    such as BatchNorm's running statistics are left out: each rank updates them locally.)"""
    h = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(args: argparse.Namespace) -> dict:
    recipe = PRESETS[args.model]
    use_cuda = torch.cuda.is_available() and args.num_gpus > 0
    device = torch.device("cuda" if use_cuda else "cpu")
    if os.environ.get("SM_NUM_CPUS") and not use_cuda:
        # Several local "hosts" share one machine: each gets its share of the cores.
        torch.set_num_threads(max(1, int(os.environ["SM_NUM_CPUS"])))
    rank, world_size = init_distributed(args, device)
    torch.manual_seed(args.seed)
    precision, why = choose_precision(args.precision, device)
    bf16 = precision == "bf16"

    started = time.perf_counter()
    data = load_cifar10(args.data_dir)
    train_x, train_y = data["train_x"].to(device), data["train_y"].to(device)
    mean, std = channel_stats(data["train_x"])
    print(f"loaded {len(train_x)} training and {len(data['test_x'])} test images from "
          f"{args.data_dir} in {time.perf_counter() - started:.1f}s; device={device} "
          f"hosts={world_size} threads={torch.get_num_threads()}", flush=True)

    model = build_model(args.model, mean, std)
    if hasattr(model.body, "prepare"):  # data-dependent initialisation (same on every rank)
        sample = train_x[:5000].float().div(255).cpu()
        model.body.prepare((sample - model.mean) / model.std)
    model = model.to(device).to(memory_format=torch.channels_last)
    net: nn.Module = model
    if world_size > 1:
        # DDP broadcasts rank 0's initial weights and all-reduces (averages) every gradient.
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index or 0] if use_cuda else None
        )
    optimizer = SGD([p for p in model.parameters() if p.requires_grad], args.momentum,
                    recipe["nesterov"], recipe["weight_decay"])
    # DistributedSampler shards a fresh permutation per epoch; with one host it is a shuffle.
    sampler = torch.utils.data.DistributedSampler(
        range(len(train_x)), num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed
    )
    steps_per_epoch = -(-len(sampler) // args.batch_size)
    total_steps = math.ceil(steps_per_epoch * args.epochs)
    # The plan, for progress bars and for the reader of the log.
    print(f"precision={precision}; ({why})", flush=True)
    log_metrics(epochs=args.epochs, total_steps=total_steps)
    augment_gen = torch.Generator().manual_seed(args.seed * 1000 + rank)

    history = []
    step = 0
    for epoch in range(1, math.ceil(args.epochs) + 1):
        epoch_start = time.perf_counter()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        epoch_end = min(len(order), (total_steps - step) * args.batch_size)  # fraction: early
        for start in range(0, epoch_end, args.batch_size):
            idx = order[start:start + args.batch_size]
            x = to_model_input(train_x[idx], device)
            y = train_y[idx]
            if recipe["augment_pad"]:
                x = random_crop_flip(x, recipe["augment_pad"], augment_gen)
            if recipe["jpeg_fraction"]:
                x = random_jpeg(x, recipe["jpeg_fraction"], augment_gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe["label_smoothing"])
            loss.backward()
            optimizer.step(args.lr * lr_at(step, total_steps, recipe["warmup_fraction"]))
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            step += 1
        seen = epoch_end
        record = {
            "epoch": epoch,
            "images": seen,
            "steps": step,  # since the start, out of total_steps
            "train_loss": loss_sum.item() / seen,
            "train_accuracy": correct.item() / seen,
            "epoch_seconds": time.perf_counter() - epoch_start,
        }
        history.append(record)
        log_metrics(**record)

    test_loss, test_accuracy = evaluate(model, data["test_x"], data["test_y"], device, bf16)
    train_seconds = time.perf_counter() - started
    log_metrics(test_loss=test_loss, test_accuracy=test_accuracy, train_seconds=train_seconds)
    metrics = {
        "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "momentum": args.momentum, "hosts": world_size, "rank": rank,
        "samples_per_epoch": len(sampler),
        "device": device.type, "precision": precision, "precision_reason": why,
        "history": history, "test_loss": test_loss,
        "test_accuracy": test_accuracy, "train_seconds": train_seconds,
        "weights_sha256": weights_digest(model),
    }
    if world_size > 1:
        dist.destroy_process_group()
    return {"model": model, "metrics": metrics, "rank": rank, "mean": mean, "std": std}


def save_model(model: nn.Module, model_dir: Path, architecture: str,
               mean: list[float], std: list[float]) -> None:
    """state_dict + what inference needs, and the inference code in ``code/`` so the
    model directory (tarred as model.tar.gz) is hostable as is."""
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, model_dir / WEIGHTS_FILE)
    meta = {
        "architecture": architecture, "classes": list(CLASSES), "mean": mean, "std": std,
        "input_shape": list(IMAGE_SHAPE), "input_scale": "float32 pixels in [0, 1]",
        "output": "logits, one row of 10 per image", "torch_version": torch.__version__,
    }
    (model_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    code_dir = model_dir / "code"
    code_dir.mkdir(exist_ok=True)
    shutil.copy2(Path(__file__).resolve(), code_dir / Path(__file__).name)


def failure_file(args_model_dir: str) -> Path:
    """Where SageMaker reads a failed job's reason (``/opt/ml/output/failure``)."""
    output_dir = os.environ.get("SM_OUTPUT_DIR")
    return Path(output_dir) / "failure" if output_dir else Path(args_model_dir).parent / "failure"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = train(args)
        output_dir = Path(args.output_data_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / METRICS_FILE).write_text(json.dumps(result["metrics"], indent=2))
        if result["rank"] == 0:
            save_model(result["model"], Path(args.model_dir), args.model,
                       result["mean"], result["std"])
            print(f"saved model to {args.model_dir}", flush=True)
        return 0
    except BaseException as e:  # SageMaker contract: any failure leaves a reason behind
        reason = f"{type(e).__name__}: {e}"
        path = failure_file(args.model_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{reason}\n\n{traceback.format_exc()}")
        print(f"training failed: {reason}", file=sys.stderr, flush=True)
        traceback.print_exc()
        return 130 if isinstance(e, KeyboardInterrupt) else 1


# ---------------------------------------------------------------------------------------------
# Inference handlers (SageMaker PyTorch serving contract)
# ---------------------------------------------------------------------------------------------

NPY = "application/x-npy"
JSON = "application/json"
SUPPORTED_TYPES = (NPY, JSON)

try:  # Inside SageMaker's inference toolkit, its error type sets the HTTP status of the reply.
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ToolkitError
except ImportError:  # Anywhere else (our local server) the status_code attribute does the same.

    class _ToolkitError(Exception):  # type: ignore[no-redef]
        def __init__(self, status_code: int, message: str, phrase: str) -> None:
            super().__init__(status_code, message, phrase)
            self.status_code, self.message, self.phrase = status_code, message, phrase


class InferenceError(_ToolkitError):
    """A request the model cannot answer; ``status_code`` is the HTTP status to reply with."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(self.status, message, message)

    def __str__(self) -> str:
        return self.message


class InvalidPayload(InferenceError):
    status = 400


class UnsupportedMediaType(InferenceError):
    status = 415


class NotAcceptable(InferenceError):
    status = 406


def model_fn(model_dir: str) -> Classifier:
    model_path = Path(model_dir)
    meta = json.loads((model_path / META_FILE).read_text())
    model = build_model(meta["architecture"], meta["mean"], meta["std"])
    state = torch.load(model_path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.fold_normalisation()
    # A serving process holds one model, so this process-wide switch is the model's to set.
    onednn = PRESETS[meta["architecture"]]["onednn_inference"]
    torch.backends.mkldnn.enabled = onednn
    model.channels_last = onednn
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The training rule: bf16 only where this machine computes it natively. PyTorch's native
    # CPU kernels (used instead of oneDNN's, see "onednn_inference") gain nothing from it.
    model.precision, why = choose_precision("auto", device)
    if device.type == "cpu" and not onednn:
        model.precision, why = "fp32", "native CPU kernels (oneDNN off for this network)"
    print(f"serving {meta['architecture']} on {device} in {model.precision} ({why})", flush=True)
    return model.to(device).eval()


def _media_type(header: str | None) -> str:
    """'application/json; charset=utf-8' → 'application/json'."""
    return (header or "").split(";")[0].strip().lower()


def input_fn(request_body: bytes | str, content_type: str) -> torch.Tensor:
    """Request body → float32 tensor N x 3 x 32 x 32 in [0, 1].

    ``application/x-npy``: ``numpy.save`` bytes, loaded without pickles; float16/32/64 pixels
    are taken as [0, 1], uint8 pixels as 0..255. ``application/json``: nested lists (or
    ``{"instances": [...]}``) of float pixels in [0, 1]. A single 3 x 32 x 32 image is taken as
    a batch of one.
    """
    media = _media_type(content_type)
    if isinstance(request_body, str):  # the SageMaker toolkit decodes JSON bodies to text
        request_body = request_body.encode()
    if media == NPY:
        array = _read_npy(request_body)
    elif media == JSON:
        try:
            decoded = json.loads(request_body)
            if isinstance(decoded, dict):
                decoded = decoded["instances"]
            array = np.asarray(decoded, dtype=np.float32)
        except Exception as e:
            raise InvalidPayload(
                f"body is not a JSON array of numbers (or {{\"instances\": [...]}}): {e}"
            ) from e
    else:
        raise UnsupportedMediaType(
            f"content type {content_type!r} is not supported; use one of {list(SUPPORTED_TYPES)}"
        )
    return _to_batch(array)


# The header numpy.save writes for plain arrays. Matching it directly costs a tenth of numpy's
# own header parser (ast.literal_eval), which stays the fallback for any other header.
_NPY_HEADER = re.compile(
    rb"\x93NUMPY\x01\x00..\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': (False|True), "
    rb"'shape': \((\d+(?:, \d+)*)?,?\), \} *\n", re.DOTALL)


def _npy_header(body: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, offset of the data) of a .npy body."""
    match = _NPY_HEADER.match(body)
    if match:
        shape = tuple(int(n) for n in match.group(3).split(b", ")) if match.group(3) else ()
        return shape, match.group(2) == b"True", np.dtype(match.group(1).decode()), match.end()
    buffer = io.BytesIO(body)
    version = np.lib.format.read_magic(buffer)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(buffer)
    return shape, fortran_order, dtype, buffer.tell()


def _read_npy(body: bytes) -> np.ndarray:
    """Parses a .npy body without pickles, checking the header (dtype, shape, length) before
    touching the array data, which is then viewed in place rather than copied."""
    try:
        shape, fortran_order, dtype, offset = _npy_header(body)
    except Exception as e:
        raise InvalidPayload(f"body is not a valid .npy array: {e}") from e
    if dtype.hasobject:
        raise InvalidPayload("the .npy array holds pickled Python objects, which are refused")
    _check_shape(shape)
    expected = math.prod(shape) * dtype.itemsize
    data = memoryview(body)[offset:]
    if len(data) < expected:
        raise InvalidPayload(f".npy body is truncated: {len(data)} of {expected} data bytes")
    array = np.frombuffer(data[:expected], dtype=dtype)
    return array.reshape(shape, order="F" if fortran_order else "C")


def _check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or tuple(shape[1:]) != IMAGE_SHAPE or shape[0] == 0:
        raise InvalidPayload(f"expected images shaped N x 3 x 32 x 32 (N >= 1), got {shape}")


def _to_batch(array: np.ndarray) -> torch.Tensor:
    _check_shape(tuple(array.shape))
    if array.ndim == 3:
        array = array[None]
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255)
    if array.dtype.kind != "f":
        raise InvalidPayload(
            f"expected float pixels in [0, 1] or uint8 pixels, got dtype {array.dtype}"
        )
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InvalidPayload("images contain NaN or infinite values")
    return torch.from_numpy(array)


def predict_fn(input_data: torch.Tensor, model: Classifier) -> np.ndarray:
    """Logits N x 10, computed in eval mode without gradients."""
    if model.training:
        model.eval()
    device = model.mean.device  # next(model.parameters()) walks every submodule: ~15 µs a call
    # no_grad rather than inference_mode: entering inference_mode costs ~30 µs per call,
    # a quarter of a small request's whole forward pass.
    with torch.no_grad():
        if model.precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return model(input_data.to(device)).float().cpu().numpy()
        return model(input_data.to(device)).float().cpu().numpy()


def output_fn(prediction: np.ndarray, accept: str | None) -> tuple[bytes, str]:
    """Encodes the logits in the first supported type listed in ``Accept`` (default JSON)."""
    for media in (accept or JSON).split(","):
        media = _media_type(media)
        if media in ("*/*", "application/*", "", JSON):
            return json.dumps(prediction.tolist()).encode(), JSON
        if media == NPY:
            buffer = io.BytesIO()
            np.save(buffer, prediction.astype(np.float32), allow_pickle=False)
            return buffer.getvalue(), NPY
    raise NotAcceptable(f"cannot answer in {accept!r}; accepted: {list(SUPPORTED_TYPES)}")


if __name__ == "__main__":
    exit_code = main()
    # Everything is written, closed and (below) flushed: skip the interpreter's teardown,
    # which takes ~0.6 s once torch is loaded (a tenth of a default training run) and does
    # nothing this process still needs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
