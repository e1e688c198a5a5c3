"""Augmentation on whole batches of tensors, on the training device: random translation with
flips, and what a JPEG round trip does to an image. No per-sample Python work."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_translate(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation of each image by up to ``pad`` pixels either way, reflected
    borders: one gather over the batch, no per-sample Python work."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def alternating_flip(images: torch.Tensor, flipped_first: torch.Tensor, epoch: int
                     ) -> torch.Tensor:
    """airbench's alternating flip: each image is mirrored in every other epoch, starting
    from a random half (``flipped_first``, one bool per image of the batch) in epoch 1. Over
    any two epochs every image is seen both ways, which random flips only promise on average."""
    flip = flipped_first if epoch % 2 == 1 else ~flipped_first
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


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

