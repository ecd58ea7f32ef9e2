"""The hemorrhage network: a 2.5D residual U-Net with a per-slice classification head.

Input: a slice and its neighbours, each in the brain, subdural and bone windows
(``inference.windows``), e.g. 3 slices x 3 windows = 9 channels. Outputs:

* ``cls``: (N, 6) logits for ``any`` and the five subtypes (``CLASSES`` order),
  from the bottleneck by average and max pooling, over the whole matrix
  (``cls_pool="global"``) or over the head only (``cls_pool="head"``);
* ``seg``: (N, 5, H, W) logits of the five subtype masks (multi-label, sigmoid);
* ``features``: the bottleneck (last encoder stage), which Grad-CAM explains;
* ``head``: (N, 1, h, w) bool at the bottleneck's resolution, the cells that
  hold any of the head (``cls_pool="head"`` only).

Why the head only: with global pooling the average runs over the air around the
head too, so the share of the field of view the head fills (how the scanner
framed it, the pixel size) moves the logits. Grad-CAM of cross-validation
networks put most of the evidence for false positives on the air around
normal heads (docs/MODEL_CARD.md).

This module imports torch at the top: import it only where the model is used.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from inference.findings import CLASSES, SUBTYPES

logger = logging.getLogger(__name__)

#: How the class head pools the bottleneck (``ModelConfig.cls_pool``).
CLS_POOLS = ("global", "head")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters that define the network and its input; stored with the weights."""

    in_channels: int = 9
    base_width: int = 16
    depth: int = 3
    input_size: int = 128
    neighbours: int = 1
    #: ``global``: the class head pools the whole bottleneck; ``head``: only the
    #: cells with tissue (denser than -800 HU) in the centre slice.
    cls_pool: str = "global"

    def __post_init__(self) -> None:
        if self.cls_pool not in CLS_POOLS:
            raise ValueError(f"cls_pool must be one of {CLS_POOLS}, not {self.cls_pool!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the weights file."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)


class ResBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class HemorrhageNet(nn.Module):
    """2.5D residual encoder-decoder with a classification head on the bottleneck."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        c = self.config.base_width
        widths = [c * 2**i for i in range(self.config.depth + 1)]
        self.stem = nn.Sequential(
            nn.Conv2d(self.config.in_channels, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            ResBlock(c, c),
        )
        self.down = nn.ModuleList(
            ResBlock(widths[i], widths[i + 1], stride=2) for i in range(self.config.depth)
        )
        self.up = nn.ModuleList(
            ResBlock(widths[i + 1] + widths[i], widths[i])
            for i in reversed(range(self.config.depth))
        )
        self.seg_head = nn.Conv2d(c, len(SUBTYPES), 1)
        self.cls_head = nn.Sequential(nn.Dropout(0.1), nn.Linear(2 * widths[-1], len(CLASSES)))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder feature maps, finest first; the last one is the bottleneck."""
        feats = [self.stem(x)]
        for block in self.down:
            feats.append(block(feats[-1]))
        return feats

    def head_cells(self, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """(N, 1, h, w) bool: bottleneck cells over any head pixel of the centre slice.

        A pixel is head where the input's centre-slice bone window is above 0,
        that is denser than the window's lower end (-800 HU: scalp, fat and bone
        count, air does not); a cell counts when any input pixel under it does.
        """
        from inference.windows import WINDOW_PRESETS, WINDOWS

        names = list(WINDOW_PRESETS)
        channel = self.config.neighbours * len(WINDOWS) + names.index("bone")
        tissue = (x[:, channel : channel + 1] > 0).float()
        return F.adaptive_max_pool2d(tissue, tuple(shape[-2:])) > 0

    def classify(self, bottleneck: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 6) class logits from the bottleneck by average + max pooling.

        With ``head`` (N, 1, h, w) bool, both pool over those cells only (a slice
        with no head cell pools to zeros); otherwise over the whole map.
        """
        if head is None:
            pooled = torch.cat([bottleneck.mean(dim=(2, 3)), bottleneck.amax(dim=(2, 3))], dim=1)
        else:
            m = head.to(bottleneck.dtype)
            area = m.sum(dim=(2, 3)).clamp_min(1.0)
            mean = (bottleneck * m).sum(dim=(2, 3)) / area
            # Features are ReLU outputs (>= 0): zeroing the cells outside leaves the max.
            peak = (bottleneck * m).amax(dim=(2, 3))
            pooled = torch.cat([mean, peak], dim=1)
        return self.cls_head(pooled)

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """(N, 5, H, W) segmentation logits from the encoder features."""
        x = feats[-1]
        for block, skip in zip(self.up, reversed(feats[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.seg_head(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"cls": (N, 6), "seg": (N, 5, H, W), "features": bottleneck}``, and
        ``"head"`` (the pooled cells) with ``cls_pool="head"``."""
        feats = self.encode(x)
        out = {"seg": self.decode(feats), "features": feats[-1]}
        if self.config.cls_pool == "head":
            out["head"] = self.head_cells(x, tuple(feats[-1].shape))
            out["cls"] = self.classify(feats[-1], out["head"])
        else:
            out["cls"] = self.classify(feats[-1])
        return out


def fuse_batchnorm(model: HemorrhageNet) -> HemorrhageNet:
    """Fold every BatchNorm into the convolution before it, for inference (eval mode).

    The outputs are unchanged up to float rounding; the batch-norm layers become
    identities. Training a fused model is not supported.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for block in model.modules():
        if isinstance(block, ResBlock):
            block.conv1 = fuse_conv_bn_eval(block.conv1, block.bn1)
            block.bn1 = nn.Identity()  # type: ignore[assignment]
            block.conv2 = fuse_conv_bn_eval(block.conv2, block.bn2)
            block.bn2 = nn.Identity()  # type: ignore[assignment]
            if isinstance(block.shortcut, nn.Sequential):
                conv, bn = block.shortcut[0], block.shortcut[1]
                if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                    raise TypeError(
                        f"a ResBlock shortcut of {type(conv).__name__} and {type(bn).__name__}"
                        " cannot be fused (expected Conv2d and BatchNorm2d)"
                    )
                block.shortcut = fuse_conv_bn_eval(conv, bn)
    stem_conv, stem_bn = model.stem[0], model.stem[1]
    if isinstance(stem_conv, nn.Conv2d) and isinstance(stem_bn, nn.BatchNorm2d):
        model.stem[0] = fuse_conv_bn_eval(stem_conv, stem_bn)
        model.stem[1] = nn.Identity()
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
