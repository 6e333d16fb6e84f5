"""The one Predictor: every consumer of a model (evaluate, the MLflow pyfunc, serve, export)
loads it here, so preprocessing, tiling, output decoding and the defect score live in one
place (DESIGN 6.1, 5.2).

Input: uint8 RGB images, one (H, W, 3) array or a batch (B, H, W, 3) of equal size.
Output of `predict`: one numpy array per task at the images' resolution — semseg class ids
int64 (B, H, W), height mm / depth float32 (B, H, W), normals float32 unit vectors
(B, H, W, 3). `inspect` adds the defect map (B, H, W) and the defect score (B,) of
`cta_model.inspection`, from the same forward pass.

How an image meets the network is the model's input contract (model.yaml ``input``):
``resize`` scales it to the input size and the outputs back, ``exact`` refuses any other size,
``tile`` keeps the image's pitch and cuts it into input-size tiles overlapping by
``tile_overlap_px``; each tile's outputs are weighted by a window that falls linearly to a
small floor across the overlap (so seams blend) and accumulated into full-image maps. Logits
are blended (as sliding-window segmentation usually does) and the defect map is the softmax of
the blended logits, whatever the policy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cta_model.errors import DataError
from cta_model.inspection import ScoreDefinition, defect_map, image_scores
from cta_model.model_folder import ModelCard, load_model_folder
from cta_model.nn.models import MultiTaskNet, MultiTaskOutput
from cta_model.tasks import get_task, task_of_kind

#: Tiles per forward pass in tile mode: bounds memory whatever the image size.
TILE_BATCH = 16
_WINDOW_FLOOR = 0.05  # a tile's weight at its very edge, so every pixel has some weight


@dataclass(frozen=True)
class Inspection:
    """`Predictor.inspect`: the task outputs plus the defect map and score of each image."""

    outputs: dict[str, np.ndarray]
    defect_map: np.ndarray | None  # (B, H, W) float32 in [0, 1]; None without segmentation
    defect_score: np.ndarray | None  # (B,) float32


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``size`` with at least ``overlap`` shared
    pixels between neighbours; the last tile ends at the border. ``size <= tile``: one tile."""
    if size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _ramp(tile: int, overlap: int) -> torch.Tensor:
    """1-D blending weight: rises linearly over the first ``overlap`` pixels, falls over the
    last, 1 in between, never below _WINDOW_FLOOR."""
    weight = torch.ones(tile)
    if overlap > 0:
        steps = torch.linspace(_WINDOW_FLOOR, 1.0, min(overlap, tile // 2) + 2)[1:-1]
        weight[: steps.numel()] = steps
        weight[tile - steps.numel() :] = steps.flip(0)
    return weight


class Predictor:
    def __init__(
        self,
        model: MultiTaskNet,
        card: ModelCard,
        device: str | torch.device = "cpu",
        default_score: ScoreDefinition | None = None,
    ):
        self.device = torch.device(device)
        # The Predictor owns `model` (it moves it and changes its layout): channels-last runs
        # this network about 1.2x faster on CPU (oneDNN) with the same values up to float
        # rounding (~1e-6 on the defect score; bench/cpu_precision.py, test_tiled_training).
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.card = card
        self.tasks = card.spec.tasks
        # The card's arithmetic: a model validated under bf16 is scored and served under it, so
        # its operating threshold meets the scores it was chosen on (emulated, and slower, on
        # a CPU without native bf16). A GPU without bf16 runs it in fp32.
        self.bf16 = card.precision == "bf16" and (
            self.device.type != "cuda" or torch.cuda.is_bf16_supported()
        )
        self._mean = torch.tensor(card.input.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(card.input.std, device=self.device).view(1, 3, 1, 1)
        self.class_task = task_of_kind("classes", self.tasks)
        # The model's own definition; the inspection config's default for older folders.
        self.score = card.inspection or (default_score if self.class_task else None)

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        device: str | torch.device = "cpu",
        verify: bool = True,
        default_score: ScoreDefinition | None = None,
    ) -> Predictor:
        model, card = load_model_folder(folder, verify=verify)
        return cls(model, card, device, default_score)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.card.spec.input_size

    @property
    def reject_classes(self) -> tuple[int, ...]:
        return self.score.reject_classes if self.score else ()

    def _as_batch(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        batch = np.asarray(images) if not isinstance(images, np.ndarray) else images
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise DataError(f"images must be (H, W, 3) or (B, H, W, 3) RGB, got {batch.shape}")
        if batch.dtype != np.uint8:
            raise DataError(f"images must be uint8 RGB, got dtype {batch.dtype}")
        if batch.shape[0] == 0 or min(batch.shape[1:3]) < 1:
            raise DataError(f"images must not be empty, got {batch.shape}")
        return batch

    def _normalise(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean) / self._std

    def preprocess(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised float (B, 3, h, w) at the model's input size
        (the ``resize`` and ``exact`` policies; tiles are cut from `_normalise`'s output)."""
        x = self._normalise(self._as_batch(images))
        size = tuple(x.shape[-2:])
        if size != self.input_size:
            if self.card.input.resize_policy == "exact":
                raise DataError(
                    f"image size {size[0]}x{size[1]} != model input "
                    f"{self.input_size[0]}x{self.input_size[1]} (resize_policy: exact)"
                )
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return x

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> MultiTaskOutput:
        """The network on a normalised batch; outputs in float32 whatever the card's
        precision."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x.contiguous(memory_format=torch.channels_last))
        if not self.bf16:
            return out
        return MultiTaskOutput(
            {t: v.float() for t, v in out.final.items()},
            {t: v.float() for t, v in out.initial.items()},
        )

    # ---------------------------------------------------------------- raw maps
    @torch.inference_mode()
    def _maps(self, batch: np.ndarray) -> dict[str, torch.Tensor]:
        """Per task the network's (B, C, H, W) outputs at the images' resolution (logits for the
        class task), resampled or blended from tiles."""
        size = tuple(batch.shape[1:3])
        if self.card.input.resize_policy == "tile":
            return self._tiled_maps(self._normalise(batch))
        out = self.forward(self.preprocess(batch)).final
        return {
            task: value
            if tuple(value.shape[-2:]) == size
            else F.interpolate(value.float(), size=size, mode="bilinear", align_corners=False)
            for task, value in out.items()
        }

    def _tile_places(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """``x`` (channels-last, padded to at least one tile) and the tiles' top-left corners."""
        tile_h, tile_w = self.input_size
        overlap = self.card.input.tile_overlap_px
        height, width = x.shape[-2:]
        # One copy here, so every tile cut from it is a plain view of channels-last memory.
        x = x.contiguous(memory_format=torch.channels_last)
        # Images smaller than a tile are padded by reflection (replicate where too small).
        pad_h, pad_w = max(0, tile_h - height), max(0, tile_w - width)
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        full_h, full_w = x.shape[-2:]
        places = [
            (top, left)
            for top in tile_starts(full_h, tile_h, overlap)
            for left in tile_starts(full_w, tile_w, overlap)
        ]
        return x, places

    @torch.inference_mode()
    def network_inputs(self, image: np.ndarray) -> torch.Tensor:
        """What the network is fed for one uint8 (H, W, 3) image, as NCHW float: the image at
        the input size, or for a tiling model up to TILE_BATCH of its tiles at its own pitch,
        spread evenly over it (int8 calibration must see what inference sees)."""
        batch = self._as_batch(image)
        if self.card.input.resize_policy != "tile":
            return self.preprocess(batch)
        x, places = self._tile_places(self._normalise(batch))
        if len(places) > TILE_BATCH:
            picks = np.linspace(0, len(places) - 1, TILE_BATCH).round().astype(int)
            places = [places[i] for i in picks]
        tile_h, tile_w = self.input_size
        tiles = [x[..., top : top + tile_h, left : left + tile_w] for top, left in places]
        return torch.cat(tiles).contiguous()

    def _tiled_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tile_h, tile_w = self.input_size
        height, width = x.shape[-2:]
        x, places = self._tile_places(x)
        full_h, full_w = x.shape[-2:]
        overlap = self.card.input.tile_overlap_px
        window = _ramp(tile_h, overlap)[:, None] * _ramp(tile_w, overlap)[None, :]
        window = window.to(self.device)
        sums: dict[str, torch.Tensor] = {}
        weight = torch.zeros(full_h, full_w, device=self.device)
        for top, left in places:
            weight[top : top + tile_h, left : left + tile_w] += window
        batch = x.shape[0]
        for start in range(0, len(places), max(1, TILE_BATCH // batch)):
            chunk = places[start : start + max(1, TILE_BATCH // batch)]
            tiles = torch.cat([x[..., t : t + tile_h, l : l + tile_w] for t, l in chunk])
            out = self.forward(tiles).final
            for task, value in out.items():
                value = value.float().view(len(chunk), batch, *value.shape[1:])
                total = sums.get(task)
                if total is None:
                    total = sums[task] = torch.zeros(
                        batch, value.shape[2], full_h, full_w, device=self.device
                    )
                for (top, left), part in zip(chunk, value, strict=True):
                    total[..., top : top + tile_h, left : left + tile_w] += part * window
        return {task: (total / weight)[..., :height, :width] for task, total in sums.items()}

    # ------------------------------------------------------------------- public
    def _decode(self, task: str, value: torch.Tensor) -> np.ndarray:
        # Blending and resampling can shorten unit vectors; decode_prediction re-applies the
        # activation.
        return get_task(task).decode_prediction(value.float()).cpu().numpy()

    @torch.inference_mode()
    def predict(self, images: np.ndarray | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        maps = self._maps(self._as_batch(images))
        return {task: self._decode(task, maps[task]) for task in self.tasks}

    @torch.inference_mode()
    def inspect(self, images: np.ndarray | Sequence[np.ndarray]) -> Inspection:
        """Task outputs plus the defect map and score (None for a model without a class
        task or without reject classes)."""
        maps = self._maps(self._as_batch(images))
        outputs = {task: self._decode(task, maps[task]) for task in self.tasks}
        if self.class_task is None or self.score is None:
            return Inspection(outputs, None, None)
        probabilities = maps[self.class_task].float().softmax(dim=1)
        defects = defect_map(probabilities, self.score.reject_classes)
        scores = image_scores(defects, self.score.score_window_px)
        return Inspection(
            outputs,
            defects.cpu().numpy().astype(np.float32),
            scores.cpu().numpy().astype(np.float32),
        )
