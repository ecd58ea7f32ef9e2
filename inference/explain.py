"""Grad-CAM for the ``any`` head of the hemorrhage network.

The class-activation map is taken at the last encoder stage (the bottleneck the
classification head pools): channel weights are the spatial mean of the
gradient of the ``any`` logit with respect to each feature map, the map is the
ReLU of the weighted sum. Maps are normalised over the whole series (so a slice
with weak evidence stays dark beside a slice with a bleed) and resized to the
source matrix.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from inference.model import HemorrhageNet

logger = logging.getLogger(__name__)

#: Index of ``any`` in ``CLASSES``.
ANY_INDEX = 0


def gradcam_maps(
    model: HemorrhageNet, features: torch.Tensor, head: torch.Tensor | None = None
) -> torch.Tensor:
    """Raw Grad-CAM maps (N, h, w) for the ``any`` logit at bottleneck resolution.

    Parameters
    ----------
    model : HemorrhageNet
        The network, in eval mode.
    features : torch.Tensor
        (N, C, h, w) bottleneck features of a forward pass (may come from
        ``torch.inference_mode``; a normal copy is made here).
    head : torch.Tensor, optional
        (N, 1, h, w) bool, the cells the class head pools (``out["head"]`` of a
        network with ``cls_pool="head"``): the logit is explained by them only,
        and the map is zero elsewhere.

    Returns
    -------
    torch.Tensor
        (N, h, w) float32, non-negative, unnormalised.
    """
    import torch

    feats = features.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model.classify(feats, head)
        (grad,) = torch.autograd.grad(logits[:, ANY_INDEX].sum(), feats)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    maps = torch.relu((weights * feats.detach()).sum(dim=1))
    if head is not None:
        maps = maps * head[:, 0].to(maps.dtype)
    return maps


def normalise_to_source(maps: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """Resize (z, h, w) raw maps to ``shape`` and normalise them over the series to [0, 1].

    Returns
    -------
    numpy.ndarray
        float32 (z, y, x) in [0, 1]; all zeros when the model found no evidence.
    """
    import torch
    import torch.nn.functional as F

    maps = maps.float().cpu()
    out = torch.empty((maps.shape[0], *shape), dtype=torch.float32)
    for start in range(0, maps.shape[0], 16):
        chunk = maps[start : start + 16, None]
        out[start : start + 16] = F.interpolate(
            chunk, size=shape, mode="bilinear", align_corners=False
        )[:, 0]
    out.clamp_(min=0.0)
    peak = float(out.max()) if out.numel() else 0.0
    if peak > 0.0:
        out.div_(peak)
    return out.clamp_(0.0, 1.0).numpy()
