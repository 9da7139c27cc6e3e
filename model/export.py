"""Export a bundle's network to ONNX, and run it with ONNX Runtime.

ONNX Runtime runs this network about 3x faster per face than eager PyTorch on these CPUs with identical
outputs (max abs difference ~3e-7; docs/BENCHMARKS.md), so the service embeds through it by default.

A bundle may have a companion ``.onnx`` file beside it (``visage export --onnx``), stamped with the digest of
the weights it was made from. Loading it instead of exporting at start-up keeps the exporter (and the ~50 MiB
of memory it touches) out of the service; a missing or stale companion falls back to exporting in memory.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from model.bundle import Bundle

OPSET = 17
DIGEST_KEY = "visage_weights_digest"  # ONNX metadata: which weights the graph holds

log = logging.getLogger(__name__)


def onnx_bytes(bundle: Bundle) -> bytes:
    """The embedding network as an ONNX model with a dynamic batch axis; input ``x`` is the normalised
    (N, 3, R, R) float32 tensor of ``model.preprocess.crops_to_tensor``, output ``embedding`` unit vectors."""
    net = bundle.build()
    r = bundle.config.resolution
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            net, (torch.zeros(1, 3, r, r),), buf, dynamo=False, input_names=["x"], output_names=["embedding"],
            dynamic_axes={"x": {0: "n"}, "embedding": {0: "n"}}, opset_version=OPSET,
        )
    import onnx

    graph = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(graph, {DIGEST_KEY: bundle.weights_digest(), "model_version": bundle.model_version})
    return graph.SerializeToString()


def companion_path(bundle: Bundle) -> Path | None:
    """Where the bundle's exported ONNX graph lives: beside its weights file, same name, ``.onnx``."""
    return bundle.source.with_suffix(".onnx") if bundle.source else None


def onnx_runner(bundle: Bundle, threads: int | None = None) -> OnnxRunner:
    """An ONNX Runtime session for ``bundle``: its companion file when that holds these exact weights, else an
    in-memory export."""
    path = companion_path(bundle)
    if path is not None and path.is_file():
        runner = OnnxRunner(path.read_bytes(), threads)
        if runner.metadata.get(DIGEST_KEY) == bundle.weights_digest():
            return runner
        log.warning("%s was exported from other weights than %s: exporting again in memory", path, bundle.source)
    return OnnxRunner(onnx_bytes(bundle), threads)


def export_onnx(bundle: Bundle, path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the .onnx file's path")
    if bundle.source is not None and path.exists() and path.samefile(bundle.source):
        raise ValueError(f"{path} is the weights bundle being exported; give the .onnx file's path "
                         f"(beside it: {companion_path(bundle)})")
    nearest = next((parent for parent in path.parents if parent.exists()), None)
    if nearest is not None and not nearest.is_dir():  # (mkdir's own error: "File exists: 'nearest'")
        raise NotADirectoryError(f"cannot write {path}: {nearest} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onnx_bytes(bundle))
    return path


class OnnxRunner:
    """An ONNX Runtime session that maps normalised input tensors to embeddings, like the torch module."""

    def __init__(self, model: bytes, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between runs: MTCNN (torch) shares the process and the cores with this session
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(x.contiguous().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input: x})[0])
