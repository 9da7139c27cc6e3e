"""Inference variants of the face embedding network, each behind ``model.embedder.Embedder``'s contract, so the one
that wins in ``bench/embedder.py`` can move into ``model/`` as it is.

Every builder takes a trained ``FaceEmbeddingNet`` (eval mode) and returns a ``VariantEmbedder``: (N, H, W, 3)
uint8 aligned crops -> (N, dim) float32 unit vectors, through the same ``crops_to_tensor`` preprocessing, batching
and optional mirror averaging as ``Embedder.embed``. Only the forward pass differs:

| builder | what it does |
|---|---|
| ``eager`` | the module as it is, channels-last (today's ``Embedder``) or contiguous |
| ``fused`` | every Conv2d+BatchNorm2d folded into one conv, the head's Linear+BatchNorm1d into one linear |
| ``torchscript`` | ``torch.jit.trace`` + ``torch.jit.freeze`` (folds BN, lets oneDNN fuse conv+ReLU); optionally
  ``torch.jit.optimize_for_inference`` |
| ``onnxruntime`` | ``torch.onnx.export`` (TorchScript exporter, dynamic batch) -> ``onnxruntime.InferenceSession`` |
| ``bf16`` | eager under ``torch.autocast("cpu", torch.bfloat16)`` (CPUs with AVX512-BF16 / AMX) |
| ``int8_dynamic`` | ``torch.ao.quantization.quantize_dynamic`` (only the head's Linear layer is dynamic-quantisable) |
| ``int8_static_fx`` | FX graph-mode static quantisation, x86 backend, calibrated on real aligned crops |
| ``int8_static_ort`` | ONNX Runtime static QDQ quantisation (per-channel int8), calibrated on real aligned crops |

Extra packages: ``onnxruntime`` and ``onnx`` for the two ONNX variants (``pip install onnxruntime onnx``).
"""

from __future__ import annotations

import copy
import io
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model.embedder import embed_batches
from model.preprocess import crops_to_tensor

Forward = Callable[[torch.Tensor], torch.Tensor | np.ndarray]


class VariantEmbedder:
    """``model.embedder.Embedder`` with a pluggable forward pass: same preprocessing, batching, views and flip
    rule."""

    def __init__(
        self,
        forward: Forward,
        resolution: int,
        dim: int,
        *,
        channels_last: bool = True,
        flip: bool = False,
        shift: int = 0,
        batch_size: int = 64,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.forward, self.resolution, self.dim = forward, resolution, dim
        self.channels_last, self.flip, self.batch_size, self.autocast = channels_last, flip, batch_size, autocast
        self.shift = shift  # test-time views (model/tta.py), as the bundle being served averages them
        self._lock = threading.Lock()

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.autocast is not None:
            with torch.autocast("cpu", dtype=self.autocast):
                out = self.forward(x)
        else:
            out = self.forward(x)
        return torch.from_numpy(out) if isinstance(out, np.ndarray) else out.float()

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 aligned crops -> (N, dim) float32 unit vectors, through Embedder's own loop."""
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        with self._lock, torch.inference_mode():
            return embed_batches(crops, self._run, self.resolution, self.dim, batch_size=self.batch_size,
                                 flip=self.flip, shift=self.shift, memory_format=layout)


@dataclass
class Variant:
    name: str
    description: str
    embedder: VariantEmbedder
    key: str = ""  # the builder's key in ``build_all``


def _dims(net: nn.Module) -> tuple[int, int]:
    """(input resolution, embedding dim) of a FaceEmbeddingNet."""
    resolution = int(getattr(net.body, "resolution", 112))
    return resolution, int(net.head[0].out_features)


def example_input(net: nn.Module, batch: int = 1, channels_last: bool = True) -> torch.Tensor:
    resolution, _ = _dims(net)
    x = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# -- fp32 variants -------------------------------------------------------------------------------------------------


def eager(net: nn.Module, channels_last: bool = True) -> Variant:
    resolution, dim = _dims(net)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    module = copy.deepcopy(net).eval().to(memory_format=fmt)
    name = "eager, channels-last (a second copy: the noise floor)" if channels_last else "eager, contiguous (NCHW)"
    return Variant(name, "the module as it is", VariantEmbedder(module, resolution, dim, channels_last=channels_last))


def fuse_conv_bn(net: nn.Module) -> nn.Module:
    """A copy of ``net`` (eval) with every Conv2d followed by BatchNorm2d, and every Linear followed by BatchNorm1d,
    inside an ``nn.Sequential``, folded into one layer (the BatchNorm becomes Identity)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    fused = copy.deepcopy(net).eval()
    for module in fused.modules():
        if not isinstance(module, nn.Sequential):
            continue
        keys = list(module._modules)
        for a, b in zip(keys, keys[1:], strict=False):
            first, second = module._modules[a], module._modules[b]
            if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
                module._modules[a] = fuse_conv_bn_eval(first, second)
                module._modules[b] = nn.Identity()
            elif isinstance(first, nn.Linear) and isinstance(second, nn.BatchNorm1d):
                module._modules[a] = fuse_linear_bn_eval(first, second)
                module._modules[b] = nn.Identity()
    return fused


def fused(net: nn.Module) -> Variant:
    resolution, dim = _dims(net)
    module = fuse_conv_bn(net).to(memory_format=torch.channels_last)
    return Variant(
        "fused conv+BN, channels-last",
        "torch.nn.utils.fusion.fuse_conv_bn_eval / fuse_linear_bn_eval",
        VariantEmbedder(module, resolution, dim),
    )


def torchscript(net: nn.Module, optimize: bool = False) -> Variant:
    resolution, dim = _dims(net)
    module = copy.deepcopy(net).eval().to(memory_format=torch.channels_last)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example_input(net, 2), check_trace=False)
        frozen = torch.jit.freeze(traced)
        if optimize:
            frozen = torch.jit.optimize_for_inference(frozen)
    # the profiling executor specialises on the first calls: run a few of both batch sizes up front
    for batch in (1, 2, 1, 2):
        with torch.inference_mode():
            frozen(example_input(net, batch))
    name = "TorchScript trace+freeze" + (" +optimize_for_inference" if optimize else "")
    return Variant(name, "torch.jit.trace, torch.jit.freeze", VariantEmbedder(frozen, resolution, dim))


def bf16(net: nn.Module) -> Variant:
    resolution, dim = _dims(net)
    module = fuse_conv_bn(net).to(memory_format=torch.channels_last)
    return Variant(
        "fused + bf16 autocast",
        "torch.autocast('cpu', torch.bfloat16)",
        VariantEmbedder(module, resolution, dim, autocast=torch.bfloat16),
    )


def onnx_bytes(net: nn.Module, opset: int = 17) -> bytes:
    """The network as an ONNX model with a dynamic batch axis (the TorchScript-based exporter, which needs only
    the ``onnx`` package; the dynamo exporter would also need ``onnxscript``)."""
    buf = io.BytesIO()
    module = copy.deepcopy(net).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example_input(net, 1, channels_last=False),),
            buf,
            dynamo=False,
            input_names=["x"],
            output_names=["embedding"],
            dynamic_axes={"x": {0: "n"}, "embedding": {0: "n"}},
            opset_version=opset,
        )
    return buf.getvalue()


def ort_session(model: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _ort_forward(session) -> Forward:
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]

    return forward


def onnxruntime(net: nn.Module, threads: int, model: bytes | None = None) -> Variant:
    resolution, dim = _dims(net)
    session = ort_session(model or onnx_bytes(net), threads)
    return Variant(
        "ONNX Runtime fp32",
        f"torch.onnx.export -> onnxruntime {_ort_version()} (ORT_ENABLE_ALL, {threads} threads)",
        VariantEmbedder(_ort_forward(session), resolution, dim, channels_last=False),
    )


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


# -- int8 variants -------------------------------------------------------------------------------------------------


def int8_dynamic(net: nn.Module) -> Variant:
    from torch.ao.quantization import quantize_dynamic

    resolution, dim = _dims(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = quantize_dynamic(copy.deepcopy(net).eval(), {nn.Linear}, dtype=torch.qint8)
    module = module.to(memory_format=torch.channels_last)
    return Variant(
        "int8 dynamic (Linear only)",
        "torch.ao.quantization.quantize_dynamic({nn.Linear})",
        VariantEmbedder(module, resolution, dim),
    )


def int8_static_fx(net: nn.Module, calibration: np.ndarray, backend: str = "x86") -> Variant:
    """FX graph-mode post-training static quantisation: conv+BN+ReLU fused, int8 weights (per channel) and
    activations, observers calibrated on ``calibration`` (uint8 aligned crops, disjoint from the evaluation set)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    resolution, dim = _dims(net)
    torch.backends.quantized.engine = backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(
            copy.deepcopy(net).eval(), get_default_qconfig_mapping(backend), (example_input(net, 1, False),)
        )
        with torch.inference_mode():
            for start in range(0, len(calibration), 32):
                prepared(crops_to_tensor(calibration[start : start + 32], resolution))
        module = convert_fx(prepared)
    return Variant(
        f"int8 static, FX ({backend})",
        f"prepare_fx/convert_fx, {len(calibration)} calibration crops",
        VariantEmbedder(module, resolution, dim, channels_last=True),
    )


def int8_static_ort(net: nn.Module, calibration: np.ndarray, threads: int, model: bytes | None = None) -> Variant:
    """ONNX Runtime post-training static quantisation (QDQ, per-channel int8 weights, uint8 activations)."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    resolution, dim = _dims(net)
    batches = [
        {"x": crops_to_tensor(calibration[i : i + 16], resolution).numpy()} for i in range(0, len(calibration), 16)
    ]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model or onnx_bytes(net))
        try:  # let ORT fold BN etc. before inserting Q/DQ nodes (shape inference + graph optimisation)
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            src = pre
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantise the raw export without it
            pass
        quantize_static(
            str(src),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        session = ort_session(dst.read_bytes(), threads)
    return Variant(
        "int8 static, ONNX Runtime (QDQ)",
        f"onnxruntime.quantization.quantize_static, per-channel, {len(calibration)} calibration crops",
        VariantEmbedder(_ort_forward(session), resolution, dim, channels_last=False),
    )


# -- all of them ---------------------------------------------------------------------------------------------------


def build_all(
    net: nn.Module, calibration: np.ndarray, threads: int, only: list[str] | None = None
) -> tuple[list[Variant], dict[str, str]]:
    """Every variant that builds here, and why the others did not (a missing package, an export failure)."""
    model: dict[str, bytes] = {}

    def onnx_model() -> bytes:
        if "fp32" not in model:
            model["fp32"] = onnx_bytes(net)
        return model["fp32"]

    builders: dict[str, Callable[[], Variant]] = {
        "eager": lambda: eager(net, True),
        "eager_nchw": lambda: eager(net, False),
        "fused": lambda: fused(net),
        "torchscript": lambda: torchscript(net),
        "torchscript_ofi": lambda: torchscript(net, optimize=True),
        "onnxruntime": lambda: onnxruntime(net, threads, onnx_model()),
        "bf16": lambda: bf16(net),
        "int8_dynamic": lambda: int8_dynamic(net),
        "int8_static_fx": lambda: int8_static_fx(net, calibration),
        "int8_static_ort": lambda: int8_static_ort(net, calibration, threads, onnx_model()),
    }
    variants, failed = [], {}
    for key, build in builders.items():
        if only and key not in only:
            continue
        try:
            variant = build()
            variant.key = key
            variants.append(variant)
        except Exception as exc:  # noqa: BLE001 - report every failure in the table, keep measuring the rest
            failed[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return variants, failed


VARIANT_KEYS = (
    "eager",
    "eager_nchw",
    "fused",
    "torchscript",
    "torchscript_ofi",
    "onnxruntime",
    "bf16",
    "int8_dynamic",
    "int8_static_fx",
    "int8_static_ort",
)
