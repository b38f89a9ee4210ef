"""Data augmentation of training batches, in torch, on the uint8 images where they are (CPU or GPU).

Each is a handful of whole-batch tensor operations, no per-image Python, so that an augmented
epoch costs little more than a plain one. Fashion-MNIST's items are centred on a black
background (pixel 0) and its classes are left-right symmetric:

    flip    mirror half the images left-right
    shift   move each image by up to 2 pixels each way, filling with the background
    erase   blank a random rectangle (4-14 pixels a side) in half the images, to the background

Their names, and the option's text, are fmnist.core.configs' (no torch there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_SHIFT = 2  # pixels
ERASE_SIDES = (4, 14)  # pixels, both included


def augment(images: torch.Tensor, names: tuple[str, ...], generator: torch.Generator) -> torch.Tensor:
    """A new (N, 28, 28) uint8 batch of ``images`` (N, 28, 28), augmented by ``names``.

    The random draws come from ``generator`` (a CPU one, whatever the images' device), so a
    batch's augmentation depends on the seed alone."""
    n, height, width = images.shape
    device = images.device
    x = images
    if "flip" in names:
        flipped = (torch.rand(n, generator=generator) < 0.5).to(device)
        x = torch.where(flipped[:, None, None], x.flip(2), x)
    if "shift" in names:
        # Pad with the background, then read each image's 28x28 window at its own offset.
        dy, dx = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (2, n), generator=generator).to(device)
        padded = F.pad(x, (MAX_SHIFT,) * 4)
        rows = torch.arange(height, device=device) + MAX_SHIFT - dy[:, None]  # (N, 28): out[i] = in[i - dy]
        cols = torch.arange(width, device=device) + MAX_SHIFT - dx[:, None]
        x = padded[torch.arange(n, device=device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if "erase" in names:
        low, high = ERASE_SIDES
        erased = torch.rand(n, generator=generator) < 0.5
        h, w = torch.randint(low, high + 1, (2, n), generator=generator)
        top = (torch.rand(n, generator=generator) * (height - h + 1)).long()
        left = (torch.rand(n, generator=generator) * (width - w + 1)).long()
        r = torch.arange(height)
        c = torch.arange(width)
        in_rows = (r >= top[:, None]) & (r < (top + h)[:, None])  # (N, 28)
        in_cols = (c >= left[:, None]) & (c < (left + w)[:, None])
        mask = (in_rows[:, :, None] & in_cols[:, None, :] & erased[:, None, None]).to(device)
        x = x.masked_fill(mask, 0)
    return x
