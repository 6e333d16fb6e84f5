"""The one Predictor: every consumer of a model (evaluate, the MLflow pyfunc, serve, export)
loads it here, so preprocessing and output decoding live in one place (DESIGN 6.1).

Input: uint8 RGB images, one (H, W, 3) array or a batch (B, H, W, 3) of equal size.
Output: one numpy array per task at the images' resolution — semseg class ids int64 (B, H, W),
height mm / depth float32 (B, H, W), normals float32 unit vectors (B, H, W, 3).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cta_model.errors import DataError
from cta_model.model_folder import ModelCard, load_model_folder
from cta_model.nn.models import MultiTaskNet, MultiTaskOutput
from cta_model.tasks import get_task


class Predictor:
    def __init__(self, model: MultiTaskNet, card: ModelCard, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.card = card
        self.tasks = card.spec.tasks
        self._mean = torch.tensor(card.input.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(card.input.std, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
    ) -> Predictor:
        model, card = load_model_folder(folder, verify=verify)
        return cls(model, card, device)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.card.spec.input_size

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

    def preprocess(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised float (B, 3, h, w) at the model's input size."""
        batch = self._as_batch(images)
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        size = tuple(x.shape[-2:])
        if size != self.input_size:
            if self.card.input.resize_policy == "exact":
                raise DataError(
                    f"image size {size[0]}x{size[1]} != model input "
                    f"{self.input_size[0]}x{self.input_size[1]} (resize_policy: exact)"
                )
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> MultiTaskOutput:
        return self.model(x)

    @torch.inference_mode()
    def predict(self, images: np.ndarray | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        batch = self._as_batch(images)
        out = self.forward(self.preprocess(batch)).final
        size = tuple(batch.shape[1:3])
        return {task: self._decode(task, out[task], size) for task in self.tasks}

    def _decode(self, task: str, raw: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        if tuple(raw.shape[-2:]) != size:
            raw = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
        # Resampling can shorten unit vectors; decode_prediction re-applies the activation.
        decoded = get_task(task).decode_prediction(raw.float())
        return decoded.cpu().numpy()
