"""Tensor conversion, joint geometric augmentation and collation of samples (DESIGN 4.1).

A sample dict from any loader (``LineDataset`` or ``formats``) is first converted by
``to_tensors``; the transforms then act on the tensor sample, applying each geometric change to
the image *and* to every task label by the registry's rules (``TaskSpec.hflip`` /
``TaskSpec.resize``), so no task name is switched on here. Tensor sample::

    sample_id, line_id         str
    image                      float32 (3, H, W) in [0, 1] (after Normalize: standardised)
    <task>                     semseg int64 (H, W); others float32 (C, H, W); invalid as stored
    present                    {task: bool tensor ()}
    pitch_mm_per_px            float (NaN = unknown)

Randomness comes only from the ``torch.Generator`` passed to each call (the global torch RNG
when None): the same generator state gives the same output. ``sample_generator(seed, epoch,
index)`` makes one per sample, so results do not depend on DataLoader workers or order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from cta_model.errors import ConfigError, DataError
from cta_model.tasks import TASKS, get_task, parse_tasks

Sample = dict[str, Any]


class Transform(Protocol):
    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample: ...


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded from (seed, epoch, sample index): independent, reproducible streams."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


# --- conversion ---


def to_tensors(sample: Mapping[str, Any], tasks: str | Iterable[str]) -> Sample:
    """Numpy sample -> tensor sample holding the image and the labels of ``tasks`` only.

    A task missing from the sample (e.g. ``depth`` of a line dataset) is filled with the
    registry's invalid value and ``present=False``, like a task the format lacks.
    """
    task_names = parse_tasks(tasks)
    sample_id = sample.get("sample_id", "?")
    image = np.asarray(sample["image"])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(
            f"sample {sample_id}: image: {image.dtype} {image.shape}, expected uint8 (H, W, 3)"
        )
    height, width = image.shape[:2]
    out: Sample = {
        "sample_id": sample_id,
        "line_id": sample.get("line_id", ""),
        "image": torch.from_numpy(_writable(image)).permute(2, 0, 1).float() / 255.0,
    }
    flags: Mapping[str, bool] = sample.get("present", {})
    present: dict[str, torch.Tensor] = {}
    for task in task_names:
        spec = get_task(task)
        if task in sample:
            out[task] = _label_tensor(sample_id, task, sample[task], (height, width))
            present[task] = torch.tensor(bool(flags.get(task, True)))
        else:
            channels = () if spec.label_channels == 0 else (spec.label_channels,)
            out[task] = torch.full(
                (*channels, height, width), spec.fill_value, dtype=spec.label_dtype
            )
            present[task] = torch.tensor(False)
    out["present"] = present
    out["pitch_mm_per_px"] = float(sample.get("pitch_mm_per_px", math.nan))
    if "anomalies" in sample:  # how many synthetic anomalies PasteAnomalies put in
        out["anomalies"] = int(sample["anomalies"])
    if TILE_ON_DEFECT in sample:  # the tile plan's wish for this sample (RandomTile reads it)
        out[TILE_ON_DEFECT] = bool(sample[TILE_ON_DEFECT])
    return out


def _writable(array: np.ndarray) -> np.ndarray:
    # PIL and memory-mapped reads give read-only arrays, which torch.from_numpy warns about;
    # copy only those (and non-contiguous ones).
    return np.require(array, requirements=["C_CONTIGUOUS", "WRITEABLE"])


def _label_tensor(
    sample_id: str, task: str, label: np.ndarray, shape: tuple[int, int]
) -> torch.Tensor:
    """Numpy layout (H, W) / (H, W, C) -> memory layout (H, W) / (C, H, W) of the registry."""
    spec = get_task(task)
    array = np.asarray(label)
    # numpy layout: (H, W) for class ids and one-channel labels, (H, W, C) otherwise
    expected = shape if spec.label_channels <= 1 else (*shape, spec.label_channels)
    if array.ndim == 3 and spec.label_channels == 1 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.shape != expected:
        raise DataError(
            f"sample {sample_id}: {task}: shape {array.shape}, expected {expected} (from the image)"
        )
    tensor = torch.from_numpy(_writable(array)).to(spec.label_dtype)
    if spec.label_channels == 1:
        return tensor.unsqueeze(0)
    if spec.label_channels > 1:
        return tensor.permute(2, 0, 1).contiguous()
    return tensor


class ToTensors:
    """``to_tensors`` as a Compose step."""

    def __init__(self, tasks: str | Iterable[str]) -> None:
        self.tasks = parse_tasks(tasks)

    def __call__(self, sample: Mapping[str, Any], generator: torch.Generator | None = None):
        return to_tensors(sample, self.tasks)


# --- geometric transforms ---


def _label_keys(sample: Mapping[str, Any]) -> list[str]:
    return [key for key in sample if key in TASKS]


def _image(sample: Mapping[str, Any]) -> torch.Tensor:
    image = sample.get("image")
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise TypeError("transforms act on tensor samples: apply to_tensors / ToTensors first")
    return image


def _resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # align_corners=False maps pixel centres (src = (dst + 0.5) * in / out - 0.5); labels follow
    # exactly when TaskSpec.resize samples centres too ('nearest-exact'; torch 'nearest' is
    # up to one output pixel off at non-integer ratios, see test_transforms' xfail).
    return F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]


def _check_size(size: Sequence[int] | None, what: str) -> tuple[int, int] | None:
    if size is None:
        return None
    if len(size) != 2 or min(int(v) for v in size) < 1:
        raise ConfigError(f"{what}: size must be (height, width) >= 1, got {tuple(size)}")
    return int(size[0]), int(size[1])


class RandomHorizontalFlip:
    """Mirror image and labels with probability ``p`` (normals: n_x negated, per the registry)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        _image(sample)
        # Always draw, so the stream position does not depend on p.
        if torch.rand((), generator=generator).item() >= self.p:
            return dict(sample)
        return hflip(sample)


def hflip(sample: Sample) -> Sample:
    """Deterministic horizontal flip of image and labels."""
    out = dict(sample)
    out["image"] = _image(sample).flip(-1)
    for task in _label_keys(sample):
        out[task] = TASKS[task].hflip(sample[task])
    return out


class RandomScaleCrop:
    """Zoom in by s drawn from ``scales``, then crop a random ``size`` window (MTAN-style).

    Image bilinear; labels by ``TaskSpec.resize(label, size, scale=s)`` (nearest; depth divided
    by s, normals re-normalised); ``pitch_mm_per_px`` divided by s. ``size`` None keeps the input
    size. Where the zoomed image is smaller than ``size`` it is padded at the bottom / right
    (image 0, labels invalid). ``depth_is_disparity=True`` (Cityscapes, whose ``depth`` is
    disparity) multiplies depth-like labels by s instead of dividing.
    """

    def __init__(
        self,
        scales: Sequence[float] = (1.0, 1.2, 1.5),
        size: Sequence[int] | None = None,
        depth_is_disparity: bool = False,
    ) -> None:
        if not scales or min(scales) <= 0:
            raise ConfigError(f"RandomScaleCrop: scales must be > 0, got {tuple(scales)}")
        self.scales = tuple(float(s) for s in scales)
        self.size = _check_size(size, "RandomScaleCrop")
        self.depth_is_disparity = depth_is_disparity

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        image = _image(sample)
        in_h, in_w = image.shape[-2:]
        out_h, out_w = self.size or (in_h, in_w)
        scale = self.scales[int(torch.randint(len(self.scales), (), generator=generator))]
        scaled = (max(1, round(in_h * scale)), max(1, round(in_w * scale)))
        pad_h, pad_w = max(0, out_h - scaled[0]), max(0, out_w - scaled[1])
        top = int(torch.randint(scaled[0] + pad_h - out_h + 1, (), generator=generator))
        left = int(torch.randint(scaled[1] + pad_w - out_w + 1, (), generator=generator))
        window = (slice(top, top + out_h), slice(left, left + out_w))

        out = dict(sample)
        zoomed = F.pad(_resize_image(image, scaled), (0, pad_w, 0, pad_h), value=0.0)
        out["image"] = zoomed[..., window[0], window[1]]
        for task in _label_keys(sample):
            spec = TASKS[task]
            value_scale = 1.0 / scale if self.depth_is_disparity and spec.divide_by_scale else scale
            label = spec.resize(sample[task], scaled, scale=value_scale)
            if pad_h or pad_w:
                label = _pad(label, pad_h, pad_w, spec.fill_value, spec.label_channels == 0)
            out[task] = label[..., window[0], window[1]]
        out["pitch_mm_per_px"] = float(sample.get("pitch_mm_per_px", math.nan)) / scale
        return out


def _pad(
    label: torch.Tensor, pad_h: int, pad_w: int, fill: float, no_channel_axis: bool
) -> torch.Tensor:
    x = label.unsqueeze(0) if no_channel_axis else label
    x = F.pad(x, (0, pad_w, 0, pad_h), value=fill)
    return x.squeeze(0) if no_channel_axis else x


class Resize:
    """Resize the whole view to ``size`` (image bilinear, labels nearest by the registry).

    The field of view is kept, so depth values are unchanged (scale 1) and ``pitch_mm_per_px``
    is multiplied by in_width / out_width (the horizontal pitch; keep the aspect ratio for
    square pixels and geometrically exact normals).
    """

    def __init__(self, size: Sequence[int]) -> None:
        checked = _check_size(size, "Resize")
        assert checked is not None
        self.size = checked

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        image = _image(sample)
        in_w = image.shape[-1]
        out = dict(sample)
        out["image"] = _resize_image(image, self.size)
        for task in _label_keys(sample):
            out[task] = TASKS[task].resize(sample[task], self.size, scale=1.0)
        pitch = float(sample.get("pitch_mm_per_px", math.nan))
        out["pitch_mm_per_px"] = pitch * in_w / self.size[1]
        return out


TILE_ON_DEFECT = "tile_on_defect"  # sample key set by a tile plan (DefectBalancedTiles)


class RandomTile:
    """Cut a ``size`` window at the image's own pitch (no resampling): the training and
    validation tiles of a tiled model (cta_model.inference tiles the same way at inference).

    The window holds a random reject-class pixel when the sample asks for it (its
    ``TILE_ON_DEFECT`` key, set by a tile plan that balances defect tiles over the split), else
    with probability ``defect_fraction`` (when the sample's ``class_task`` label has pixels of
    ``reject_classes``); otherwise a random labelled pixel. The pixel lands anywhere but the
    outer eighth of the window. Images smaller than the window are padded at the bottom /
    right (image 0, labels invalid). ``pitch_mm_per_px`` is unchanged.
    """

    def __init__(
        self,
        size: Sequence[int],
        class_task: str | None,
        reject_classes: Sequence[int] = (),
        defect_fraction: float = 0.0,
    ) -> None:
        checked = _check_size(size, "RandomTile")
        assert checked is not None
        if not 0.0 <= defect_fraction <= 1.0:
            raise ConfigError(
                f"RandomTile: defect_fraction must be in [0, 1], got {defect_fraction}"
            )
        self.size = checked
        self.class_task = class_task
        self.reject_classes = torch.tensor([int(c) for c in reject_classes], dtype=torch.int64)
        self.defect_fraction = defect_fraction

    def _centre(self, sample: Sample, generator: torch.Generator | None) -> tuple[int, int]:
        height, width = _image(sample).shape[-2:]
        # Always draw, so the stream position does not depend on the label.
        want_defect = torch.rand((), generator=generator).item() < self.defect_fraction
        if TILE_ON_DEFECT in sample:
            want_defect = bool(sample[TILE_ON_DEFECT])
        pick = torch.rand((), generator=generator).item()
        label = sample.get(self.class_task) if self.class_task else None
        if label is not None and bool(sample["present"][self.class_task]):
            pool = torch.isin(label, self.reject_classes) if want_defect else None
            if pool is None or not bool(pool.any()):
                pool = label >= 0
            points = pool.nonzero()
            if points.shape[0]:
                y, x = points[min(int(pick * points.shape[0]), points.shape[0] - 1)].tolist()
                return y, x
        return min(int(pick * height), height - 1), min(
            int(torch.rand((), generator=generator).item() * width), width - 1
        )

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        image = _image(sample)
        tile_h, tile_w = self.size
        pad_h, pad_w = max(0, tile_h - image.shape[-2]), max(0, tile_w - image.shape[-1])
        out = dict(sample)
        if pad_h or pad_w:
            out["image"] = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            for task in _label_keys(sample):
                spec = TASKS[task]
                out[task] = _pad(
                    sample[task], pad_h, pad_w, spec.fill_value, spec.label_channels == 0
                )
        centre_y, centre_x = self._centre(out, generator)
        out.pop(TILE_ON_DEFECT, None)
        height, width = out["image"].shape[-2:]
        margin_h, margin_w = tile_h // 8, tile_w // 8
        offset_y = int(
            torch.randint(margin_h, max(margin_h + 1, tile_h - margin_h), (), generator=generator)
        )
        offset_x = int(
            torch.randint(margin_w, max(margin_w + 1, tile_w - margin_w), (), generator=generator)
        )
        top = min(max(centre_y - offset_y, 0), height - tile_h)
        left = min(max(centre_x - offset_x, 0), width - tile_w)
        window = (slice(top, top + tile_h), slice(left, left + tile_w))
        out["image"] = out["image"][..., window[0], window[1]]
        for task in _label_keys(out):
            out[task] = out[task][..., window[0], window[1]]
        return out


class PasteAnomalies:
    """Synthetic anomalies (cta_model.data.anomalies) pasted into a RAW sample (numpy, before
    ToTensors) that has a class label: the label becomes ``class_id`` under each pasted
    anomaly and every other task's label its invalid value there (a pasted defect has unknown
    geometry, so the tasks never contradict each other). Anomalies go where the class label is
    in ``region_classes`` (anywhere labelled when None). Samples without a class label are left
    alone (nothing would learn from the paste). The number pasted is recorded as
    ``sample["anomalies"]`` (an int, 0 when none)."""

    def __init__(
        self,
        config: Any,
        class_task: str,
        class_id: int,
        region_classes: Sequence[int] | None = None,
    ) -> None:
        self.config = config
        self.class_task = class_task
        self.class_id = int(class_id)
        self.region_classes = None if region_classes is None else np.asarray(region_classes)

    def __call__(self, sample: Mapping[str, Any], generator: torch.Generator | None = None):
        from cta_model.data.anomalies import paste_anomalies

        # Always draw, so the stream position does not depend on the sample.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=generator)))
        out = dict(sample)
        out["anomalies"] = 0
        labelled = bool(sample.get("present", {}).get(self.class_task, True))
        if self.class_task not in sample or not labelled:
            return out
        label = np.asarray(sample[self.class_task])
        wanted = self.region_classes
        region = label >= 0 if wanted is None else np.isin(label, wanted)
        pasted = paste_anomalies(np.asarray(sample["image"]), rng, self.config, region=region)
        if not pasted.kinds:
            return out
        out["anomalies"] = len(pasted.kinds)
        out["image"] = pasted.image
        for task in _label_keys(sample):
            value = np.array(sample[task], copy=True)
            value[pasted.mask] = (
                self.class_id if task == self.class_task else TASKS[task].fill_value
            )
            out[task] = value
        return out


class Normalize:
    """Standardise the image per channel: (x - mean) / std. Labels are untouched."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(
                f"Normalize: mean and std need 3 values, std > 0; got {tuple(mean)}, {tuple(std)}"
            )
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        return dict(sample) | {"image": (_image(sample) - self.mean) / self.std}


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Any, generator: torch.Generator | None = None) -> Sample:
        for transform in self.transforms:
            sample = transform(sample, generator)
        return sample


# --- batching ---


def collate(samples: Sequence[Sample]) -> dict[str, Any]:
    """Stack tensor samples into a batch: tensors (B, ...), ``present`` {task: (B,) bool},
    ``pitch_mm_per_px`` float64 (B,), ``sample_id`` / ``line_id`` lists."""
    if not samples:
        raise ValueError("collate: no samples")
    keys = list(samples[0])
    for sample in samples[1:]:
        if set(sample) != set(keys):
            raise DataError(
                f"collate: sample {sample.get('sample_id')} has keys {sorted(sample)}, sample "
                f"{samples[0].get('sample_id')} has {sorted(keys)}"
            )
    batch: dict[str, Any] = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            batch[key] = _stack(key, values, samples)
        elif isinstance(first, Mapping):
            batch[key] = {
                name: _stack(f"{key}.{name}", [value[name] for value in values], samples)
                for name in first
            }
        elif isinstance(first, float | int) and not isinstance(first, bool):
            batch[key] = torch.tensor(values, dtype=torch.float64)
        else:
            batch[key] = list(values)
    return batch


def _stack(key: str, values: list[torch.Tensor], samples: Sequence[Sample]) -> torch.Tensor:
    shapes = {tuple(value.shape) for value in values}
    if len(shapes) > 1:
        described = ", ".join(
            f"{sample.get('sample_id')}: {tuple(value.shape)}"
            for sample, value in zip(samples, values, strict=True)
        )
        raise DataError(f"collate: {key}: shapes differ ({described}); resize or crop first")
    return torch.stack(values)
