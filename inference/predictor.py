"""Prediction: a HU volume in, :class:`~inference.findings.SeriesFindings` out.

Owns the weights file format (network config, state dict, decision thresholds,
version and training provenance in one ``torch.save`` dict), loading the
bundled weights through ``importlib.resources``, device selection, batching,
per-slice and series-level probabilities, masks at the source matrix, volumes
in mL and the series-level decisions. Torch is imported when a predictor is
made, never at module import.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.findings import CLASSES, SUBTYPES, SeriesFindings, SliceResult, SubtypeFinding

if TYPE_CHECKING:
    import torch

    from inference.model import HemorrhageNet, ModelConfig
    from inference.volume import Volume

logger = logging.getLogger(__name__)

WEIGHTS_FORMAT = "ichnode-ich"
WEIGHTS_FORMAT_VERSION = 1
BUNDLED_WEIGHTS = "weights/ichnode-ich.pt"
DEFAULT_MASK_THRESHOLD = 0.5


class WeightsError(ValueError):
    """A weights file that is missing, unreadable or not an ichnode weights file."""


@dataclass
class RawPrediction:
    """Network outputs for one volume before any decision.

    ``slice_probabilities`` (z, 6) in ``CLASSES`` order; ``masks`` bool
    (5, z, y, x) at the source matrix, thresholded at the mask threshold but not
    yet gated by the series decisions; ``gradcam`` (z, y, x) or None.
    """

    slice_probabilities: np.ndarray
    masks: np.ndarray
    gradcam: np.ndarray | None


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    return device


#: ``auto``: float16 autocast on CUDA, bfloat16 autocast on CPUs with AMX bfloat16
#: units, float32 elsewhere; ``fp32``: never autocast (bit-stable across machines).
PRECISIONS = ("auto", "fp32")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (Intel AMX), where autocast pays.

    Elsewhere bfloat16 convolutions are emulated and slower than float32.
    """
    import torch

    return bool(torch.cpu.get_capabilities().get("amx_bf16", False))


def amp_dtype_for(device: str) -> Any:
    """The reduced precision of a resolved ``device``: float16 on CUDA, bfloat16 on CPU."""
    import torch

    return torch.float16 if device == "cuda" else torch.bfloat16


def autocast_dtype(device: str, precision: str) -> Any:
    """The autocast dtype for a resolved ``device`` and ``precision``; None for float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or fp32, not {precision!r}")
    if precision == "fp32" or (device != "cuda" and not cpu_has_native_bf16()):
        return None
    return amp_dtype_for(device)


#: Ways to pool slice probabilities into a series probability: the maximum, or
#: the mean of the k highest slices (``top2``, ``top3``), chosen on validation data.
POOLINGS = ("max", "top2", "top3")


def pool_slices(slice_probabilities: np.ndarray, pooling: str = "max") -> np.ndarray:
    """(z, 6) slice probabilities to (6,) series probabilities."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    if slice_probabilities.shape[0] == 0:
        return np.zeros(slice_probabilities.shape[1], dtype=np.float64)
    if pooling == "max":
        return np.asarray(slice_probabilities.max(axis=0), dtype=np.float64)
    k = min(int(pooling[3:]), slice_probabilities.shape[0])
    top = np.sort(slice_probabilities, axis=0)[-k:]
    return np.asarray(top.mean(axis=0), dtype=np.float64)


def series_probabilities(slice_probabilities: np.ndarray, pooling: str = "max") -> dict[str, float]:
    """Series-level probability of each class from its slices (see :data:`POOLINGS`)."""
    pooled = pool_slices(slice_probabilities, pooling)
    return {name: float(pooled[i]) for i, name in enumerate(CLASSES)}


def decide(probabilities: dict[str, float], thresholds: dict[str, float]) -> dict[str, bool]:
    """Series-level present/absent per class.

    Hemorrhage (``any``) is the primary decision: present when its probability
    reaches its threshold. A subtype is present when hemorrhage is present and
    the subtype's probability reaches its own threshold, so the answer is never
    "a subdural but no hemorrhage", and the weaker subtype heads cannot turn a
    negative series positive.
    """
    any_present = probabilities["any"] >= thresholds["any"]
    present = {
        name: bool(any_present and probabilities[name] >= thresholds[name]) for name in SUBTYPES
    }
    present["any"] = bool(any_present)
    return present


def read_weights(weights: str | Path | None) -> tuple[dict[str, Any], str]:
    """Load a weights file (None or "" = the bundled one); return (checkpoint, sha256)."""
    import torch

    if weights is None or str(weights) == "":
        resource = importlib.resources.files("inference").joinpath(BUNDLED_WEIGHTS)
        try:
            data = resource.read_bytes()
        except FileNotFoundError as exc:
            raise WeightsError(f"bundled weights {BUNDLED_WEIGHTS} are missing") from exc
        name = f"bundled {BUNDLED_WEIGHTS}"
    else:
        path = Path(weights)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise WeightsError(f"cannot read weights file {path}: {exc.strerror}") from exc
        name = str(path)
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; re-raised with a name
        raise WeightsError(f"{name} is not a readable torch weights file ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != WEIGHTS_FORMAT:
        raise WeightsError(f"{name} is not an ichnode weights file")
    if ckpt.get("format_version") != WEIGHTS_FORMAT_VERSION:
        raise WeightsError(
            f"{name} has weights format version {ckpt.get('format_version')}, "
            f"this build reads {WEIGHTS_FORMAT_VERSION}"
        )
    return ckpt, hashlib.sha256(data).hexdigest()


def make_checkpoint(
    model: HemorrhageNet,
    *,
    thresholds: dict[str, float],
    version: str,
    training: dict[str, Any],
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    pooling: str = "max",
) -> dict[str, Any]:
    """The dict that is saved as a weights file."""
    missing = [name for name in CLASSES if name not in thresholds]
    if missing:
        raise ValueError(f"thresholds missing for {missing}")
    return {
        "format": WEIGHTS_FORMAT,
        "format_version": WEIGHTS_FORMAT_VERSION,
        "model_name": "ichnode-ich",
        "version": version,
        "model_config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "thresholds": {name: float(thresholds[name]) for name in CLASSES},
        "mask_threshold": float(mask_threshold),
        "pooling": pooling,
        "training": training,
    }


class Predictor:
    """The hemorrhage model, loaded once, ready to analyse volumes.

    Parameters
    ----------
    weights : str, Path or None
        Weights file; None or "" loads the bundled ``inference/weights/ichnode-ich.pt``.
    device : str
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    batch_size : int, optional
        Slices per forward pass (default 16 on CPU, 64 on CUDA).
    precision : str
        ``auto`` (float16 autocast on CUDA, bfloat16 on CPUs with AMX, else
        float32) or ``fp32`` (never autocast).
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str = "auto",
        *,
        batch_size: int | None = None,
        precision: str = "auto",
    ) -> None:
        ckpt, sha256 = read_weights(weights)
        self._setup(ckpt, sha256, device, batch_size, precision)

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: dict[str, Any],
        device: str = "auto",
        *,
        batch_size: int | None = None,
        precision: str = "auto",
    ) -> Predictor:
        """A predictor from an in-memory checkpoint dict (training's validation)."""
        self = cls.__new__(cls)
        self._setup(ckpt, "", device, batch_size, precision)
        return self

    def _setup(
        self,
        ckpt: dict[str, Any],
        sha256: str,
        device: str,
        batch_size: int | None,
        precision: str,
    ) -> None:
        import torch

        from inference.model import HemorrhageNet, ModelConfig, fuse_batchnorm

        self.device = resolve_device(device)
        amp = autocast_dtype(self.device, precision) is not None
        try:
            self.config: ModelConfig = ModelConfig.from_dict(dict(ckpt["model_config"]))
            model = HemorrhageNet(self.config)
            model.load_state_dict(ckpt["state_dict"])
            self.thresholds: dict[str, float] = {
                name: float(ckpt["thresholds"][name]) for name in CLASSES
            }
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise WeightsError(f"weights do not match the ichnode network: {exc}") from exc
        self.mask_threshold = float(ckpt.get("mask_threshold", DEFAULT_MASK_THRESHOLD))
        self.pooling = str(ckpt.get("pooling", "max"))
        if self.pooling not in POOLINGS:
            raise WeightsError(f"weights ask for an unknown slice pooling {self.pooling!r}")
        self.model_name = str(ckpt.get("model_name", "ichnode-ich"))
        self.model_version = str(ckpt.get("version", ""))
        self.training: dict[str, Any] = dict(ckpt.get("training", {}))
        self.weights_sha256 = sha256
        self.batch_size = batch_size or (64 if self.device == "cuda" else 16)
        #: Autocast on, in ``amp_dtype``; a benchmark may turn it off (or on) to compare.
        self.amp = amp
        self.amp_dtype = amp_dtype_for(self.device)
        # BatchNorm folded into the convolutions and channels_last on every device
        # (faster with oneDNN on CPU too; only the class head is ever back-propagated).
        model = fuse_batchnorm(model).to(self.device)
        self.model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        logger.info(
            "loaded %s %s on %s, %s (sha256 %s)",
            self.model_name,
            self.model_version,
            self.device,
            self.precision_label,
            sha256[:12] or "in memory",
        )

    @property
    def precision_label(self) -> str:
        """``float32``, or the autocast dtype in use (``bfloat16 autocast``)."""
        return f"{str(self.amp_dtype).removeprefix('torch.')} autocast" if self.amp else "float32"

    def run(self, hu: np.ndarray, *, explain: bool = True) -> RawPrediction:
        """Run the network on a (z, y, x) HU array (a 2D array is one slice)."""
        import torch
        import torch.nn.functional as F

        from inference.explain import gradcam_maps, normalise_to_source
        from inference.windows import prepare_volume

        hu = np.asarray(hu, dtype=np.float32)
        if hu.ndim == 2:
            hu = hu[None]
        if hu.ndim != 3 or hu.shape[0] == 0 or min(hu.shape[1:]) < 2:
            raise ValueError(f"expected a (z, y, x) HU volume, got shape {hu.shape}")
        z, rows, cols = hu.shape
        probs = np.empty((z, len(CLASSES)), dtype=np.float32)
        masks = np.zeros((len(SUBTYPES), z, rows, cols), dtype=bool)
        cams: list[torch.Tensor] = []
        mask_logit = float(np.log(self.mask_threshold / (1.0 - self.mask_threshold)))
        neighbours = self.config.neighbours
        for start in range(0, z, self.batch_size):
            stop = min(z, start + self.batch_size)
            # The network input (windows x neighbours at input_size, ~2.4 MB a slice
            # at 256) is made one batch at a time, from the batch's slices and their
            # neighbours: memory follows the voxels of the series, not its slice
            # count (10,000 slices of 8x8 pixels once needed ~23 GB here).
            lo, hi = max(0, start - neighbours), min(z, stop + neighbours)
            slab = prepare_volume(hu[lo:hi], self.config.input_size, neighbours)
            xb = slab[start - lo : stop - lo].to(self.device, non_blocking=True)
            del slab
            xb = xb.contiguous(memory_format=torch.channels_last)
            with (
                torch.inference_mode(),
                torch.autocast(device_type=self.device, dtype=self.amp_dtype, enabled=self.amp),
            ):
                out = self.model(xb)
                probs[start : start + xb.shape[0]] = torch.sigmoid(out["cls"].float()).cpu().numpy()
                # Bilinear upsampling never exceeds its inputs' maximum: only the
                # (slice, subtype) maps with a pixel over the threshold are resized.
                seg = out["seg"].float()
                hits = (seg.amax(dim=(2, 3)) > mask_logit).nonzero().cpu()
                if len(hits):
                    up = F.interpolate(
                        seg[hits[:, 0], hits[:, 1]][:, None],
                        size=(rows, cols),
                        mode="bilinear",
                        align_corners=False,
                    )[:, 0]
                    found = (up > mask_logit).cpu().numpy()
                    for (b, c), m in zip(hits.tolist(), found, strict=True):
                        masks[c, start + b] = m
            if explain:
                cams.append(gradcam_maps(self.model, out["features"], out.get("head")).cpu())
        gradcam = normalise_to_source(torch.cat(cams), (rows, cols)) if explain else None
        return RawPrediction(slice_probabilities=probs, masks=masks, gradcam=gradcam)

    def predict(self, volume: Volume, *, explain: bool = True) -> SeriesFindings:
        """Analyse one series.

        Parameters
        ----------
        volume : inference.volume.Volume
            The HU volume (one slice or more).
        explain : bool
            Compute the Grad-CAM map of the ``any`` head.

        Returns
        -------
        SeriesFindings
            Per-slice probabilities, series decisions from the thresholds stored
            with the weights, masks (bool (5, z, y, x), only for subtypes found)
            at the source matrix, volumes in mL from the true voxel size.
        """
        raw = self.run(volume.hu, explain=explain)
        return self.findings(volume, raw)

    def findings(self, volume: Volume, raw: RawPrediction) -> SeriesFindings:
        """Turn raw outputs into decisions, gated masks and volumes."""
        probabilities = series_probabilities(raw.slice_probabilities, self.pooling)
        present = decide(probabilities, self.thresholds)
        masks = raw.masks.copy()
        voxel_ml = volume.voxel_volume_ml
        subtypes: dict[str, SubtypeFinding] = {}
        for i, name in enumerate(SUBTYPES):
            if not present[name]:
                masks[i] = False
            subtypes[name] = SubtypeFinding(
                present=bool(present[name]),
                probability=probabilities[name],
                volume_ml=float(masks[i].sum()) * voxel_ml,
            )
        uids = list(volume.sop_instance_uids)
        if len(uids) != raw.slice_probabilities.shape[0]:
            raise ValueError(
                f"volume has {raw.slice_probabilities.shape[0]} slices but "
                f"{len(uids)} SOP Instance UIDs"
            )
        slices = [
            SliceResult(
                sop_instance_uid=uid,
                probabilities={
                    name: float(raw.slice_probabilities[k, i]) for i, name in enumerate(CLASSES)
                },
            )
            for k, uid in enumerate(uids)
        ]
        return SeriesFindings(
            study_instance_uid=volume.study_instance_uid,
            series_instance_uid=volume.series_instance_uid,
            hemorrhage_present=bool(present["any"]),
            hemorrhage_probability=probabilities["any"],
            subtypes=subtypes,
            slices=slices,
            sop_instance_uids=uids,
            masks=masks,
            gradcam=raw.gradcam,
            model_name=self.model_name,
            model_version=self.model_version,
            weights_sha256=self.weights_sha256,
            thresholds=dict(self.thresholds),
        )
