"""``Embedder``: batches of aligned crops -> L2-normalised vectors. The only place inference runs the network."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

from model.bundle import Bundle
from model.preprocess import crops_to_tensor
from model.tta import tta_views, view_count

BACKENDS = ("torch", "onnx")
NO_FLIP = "-noflip"  # the model-version mark of embeddings made without the mirror pass


class Embedder:
    """Runs one bundle's network. ``flip`` averages a face with its mirror image (a second pass, a little more
    accuracy). The bundle's test-time views (``model.tta``: shifted copies of each crop) are averaged too; its
    thresholds were calibrated on them, so only a measurement turns them off (``views=False``).
    ``backend="onnx"`` runs the same weights through ONNX Runtime (CPU only): identical vectors, about 3x faster
    per face here (docs/BENCHMARKS.md)."""

    def __init__(self, bundle: Bundle, device: str = "cpu", flip: bool = True, batch_size: int = 64,
                 backend: str = "torch", views: bool = True) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.bundle = bundle
        self.device = torch.device(device if backend == "torch" else "cpu")
        self.flip = flip
        self.shift = bundle.test_time_shift if views else 0
        self.batch_size = batch_size
        self.backend = backend
        self._lock = threading.Lock()  # one forward at a time: intra-op threads already use every core
        if backend == "onnx":
            from model.export import onnx_runner

            self.net = onnx_runner(bundle)
            self._memory_format = torch.contiguous_format
        else:
            # channels-last: depthwise convolutions run faster per face on CPU (docs/BENCHMARKS.md)
            self.net = bundle.build().to(self.device, memory_format=torch.channels_last)
            self._memory_format = torch.channels_last

    @property
    def dim(self) -> int:
        return self.bundle.config.embedding_dim

    @property
    def model_version(self) -> str:
        """The bundle's, marked when the mirror pass is off: those vectors differ (obama2 against obama scored
        0.095 instead of 0.122 with the session-20 weights), so a gallery must not mix them with the bundle's, as it
        did with VISAGE_FLIP=false."""
        return self.bundle.model_version + ("" if self.flip else NO_FLIP)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 aligned crops -> (N, dim) float32 unit vectors."""
        with self._lock, torch.inference_mode():
            return embed_batches(crops, self.net, self.bundle.config.resolution, self.dim, batch_size=self.batch_size,
                                 flip=self.flip, shift=self.shift, memory_format=self._memory_format,
                                 device=self.device)


def embed_batches(crops: np.ndarray, forward: Callable[[torch.Tensor], torch.Tensor], resolution: int, dim: int, *,
                  batch_size: int = 64, flip: bool = True, shift: int = 0,
                  memory_format: torch.memory_format = torch.channels_last,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """The one embedding loop: preprocessing, batching, the test-time views (``shift``) and the flip rule around
    any forward pass (the network, an ONNX Runtime session, or a benchmark's inference variant). A face's vector
    is the normalised sum of its views' outputs (each view and, with ``flip``, its mirror image).

    All views of a slice of faces go through one forward call of about ``batch_size`` images: one face's ten views
    cost one batch-of-10 call (a /verify), not ten calls of one, and memory stays that of ``batch_size`` images."""
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    if len(crops) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    per_face = view_count(shift) * (2 if flip else 1)
    step = max(1, batch_size // per_face)
    out = []
    for start in range(0, len(crops), step):
        x = crops_to_tensor(crops[start : start + step], resolution)
        views = tta_views(x, shift)
        if flip:
            views += [torch.flip(v, dims=[3]) for v in views]
        batch = torch.cat(views).to(device, memory_format=memory_format)
        emb = forward(batch).reshape(len(views), len(x), -1).sum(0)
        if len(views) > 1:
            emb = torch.nn.functional.normalize(emb, dim=1)
        out.append(emb.float().cpu().numpy())
    return np.concatenate(out).astype(np.float32, copy=False)
