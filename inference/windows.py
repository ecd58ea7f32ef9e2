"""CT windows and the 2.5D network input: HU slices to windowed, resampled channels.

Owns the preprocessing shared by prediction, training and evaluation, so the
network always sees the same input whatever path the volume took: in-plane
resampling of HU to the working matrix (area averaging down, bilinear up), the
brain / subdural / bone windows, and the stacking of each slice with its
neighbours (edge slices replicated). Torch is imported inside the functions.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: The CT windows, (level, width) in HU, by name: the one table for the network
#: input, the key images burned into SC objects and the viewer's presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "bone": (600.0, 2800.0),
}
#: The window of the key images and of the viewer's default view.
BRAIN_WINDOW: tuple[float, float] = WINDOW_PRESETS["brain"]
#: (level, width) in HU: brain, subdural, bone (the network's input channels).
WINDOWS: tuple[tuple[float, float], ...] = tuple(WINDOW_PRESETS.values())
#: Slices on each side of the centre slice in the network input.
NEIGHBOURS = 1


def input_channels(neighbours: int = NEIGHBOURS, n_windows: int = len(WINDOWS)) -> int:
    """Number of network input channels for ``neighbours`` slices on each side."""
    return (2 * neighbours + 1) * n_windows


def apply_windows(
    hu: torch.Tensor, windows: tuple[tuple[float, float], ...] = WINDOWS
) -> torch.Tensor:
    """Window HU into [0, 1] channels.

    Parameters
    ----------
    hu : torch.Tensor
        (..., H, W) Hounsfield units.
    windows : tuple of (level, width)

    Returns
    -------
    torch.Tensor
        (..., len(windows), H, W) float32 in [0, 1].
    """
    import torch

    out = []
    for level, width in windows:
        low = level - width / 2.0
        out.append(((hu - low) / width).clamp_(0.0, 1.0))
    return torch.stack(out, dim=-3)


def resize_plane(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize the last two axes of (N, C, H, W) ``x`` to ``size``.

    Area averaging when shrinking (keeps the mean HU of a region, no aliasing),
    bilinear when enlarging.
    """
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def neighbour_index(n_slices: int, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """(n_slices, 2*neighbours+1) slice indices of each slice's stack, edges replicated."""
    offsets = np.arange(-neighbours, neighbours + 1)
    idx = np.arange(n_slices)[:, None] + offsets[None, :]
    return np.clip(idx, 0, n_slices - 1)


def stack_neighbours(windowed: torch.Tensor, neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """(z, W, H, W) windowed slices to (z, (2n+1)*W, H, W) 2.5D inputs."""
    import torch

    z = windowed.shape[0]
    idx = torch.from_numpy(neighbour_index(z, neighbours))
    stacked = windowed[idx]  # (z, 2n+1, W, H, W)
    return stacked.reshape(z, -1, *windowed.shape[-2:])


def prepare_volume(
    hu: np.ndarray | torch.Tensor,
    size: int,
    neighbours: int = NEIGHBOURS,
    windows: tuple[tuple[float, float], ...] = WINDOWS,
) -> torch.Tensor:
    """HU volume (z, y, x) to network input (z, C, size, size), float32.

    A 2D image (y, x) is taken as a single slice.
    """
    import torch

    t = torch.as_tensor(np.asarray(hu, dtype=np.float32))
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"expected a (z, y, x) HU volume, got shape {tuple(t.shape)}")
    small = resize_plane(t[:, None], (size, size))[:, 0]
    return stack_neighbours(apply_windows(small, windows), neighbours)
