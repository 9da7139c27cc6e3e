"""One weights file = state dict + model config + metadata; loading it rebuilds the exact network.

Metadata travels with the weights, as in torchvision's ``WeightsEnum``: model version, input size, the
verification thresholds calibrated per false-accept rate, the training recipe and the scores measured.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.errors import WeightsError
from model.files import make_parent
from model.mobilenet import FaceEmbeddingNet, ModelConfig, build_model
from model.numbers import parse_decimal
from model.score_norm import CohortNorm
from model.tta import bundle_shift

FORMAT = "visage-bundle/1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "visage-mobilenet_v1-a0.5-r112.pt"
DEFAULT_FAR = "1e-3"
FALLBACK_THRESHOLD = 0.5  # only for bundles never calibrated (a fresh, untrained network: plain cosine scoring)


@dataclass
class Bundle:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    metadata: dict[str, Any] = field(default_factory=dict)
    source: Path | None = field(default=None, repr=False, compare=False)  # the file it was loaded from
    score_norm: CohortNorm | None = field(default=None, repr=False, compare=False)  # None: plain cosine

    @property
    def scorer(self) -> CohortNorm:
        """How these weights' embeddings are compared; the thresholds are calibrated on its scores."""
        return self.score_norm or CohortNorm.plain(self.config.embedding_dim)

    @property
    def test_time_shift(self) -> int:
        """Pixels of the test-time views (``model.tta``) its embeddings, cohort and thresholds were made with."""
        return bundle_shift(self.metadata, self.config.resolution)

    @property
    def model_version(self) -> str:
        """Embeddings are comparable only within one version: it names the exact weights."""
        return str(self.metadata.get("model_version") or f"{self.config.backbone}-{self.weights_digest()[:12]}")

    @property
    def thresholds(self) -> dict[str, float]:
        """Thresholds on ``scorer``'s scores, keyed by false-accept rate, e.g. ``{"1e-3": 0.034, "1e-4": 0.093}``."""
        return {str(k): float(v) for k, v in (self.metadata.get("thresholds") or {}).items()}

    def calibrated_far(self, far: str) -> str | None:
        """The key of ``far``'s calibrated threshold however the number is written ("0.001" is "1e-3"), or None."""
        thresholds = self.thresholds
        if far in thresholds:
            return far
        value = parse_decimal(far)
        return None if value is None else next((k for k in thresholds if parse_decimal(k) == value), None)

    def threshold(self, far: str = DEFAULT_FAR) -> float:
        """The calibrated threshold for ``far``; an uncalibrated bundle (fresh network) gets a fixed fallback."""
        thresholds = self.thresholds
        if not thresholds:
            return FALLBACK_THRESHOLD
        key = self.calibrated_far(far)
        if key is None:
            raise ValueError(f"these weights are calibrated for FAR {', '.join(sorted(thresholds))}, not {far!r}")
        return thresholds[key]

    def weights_digest(self) -> str:
        h = hashlib.sha256()
        for key in sorted(self.state_dict):
            h.update(key.encode())
            h.update(self.state_dict[key].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def build(self) -> FaceEmbeddingNet:
        """The network in eval mode with these weights loaded (strictly: every tensor must match)."""
        net = build_model(self.config)
        try:
            net.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as exc:  # torch lists every tensor, one line each (a hundred for another alpha)
            problems = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc)]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            where = f"{self.source}: " if self.source else ""
            raise WeightsError(f"{where}weights do not fit the config {self.config}: "
                               f"{textwrap.shorten(problems[0], 300)}{more}") from exc
        return net.eval()


def bundle_from_model(model: FaceEmbeddingNet, config: ModelConfig, metadata: dict[str, Any] | None = None) -> Bundle:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return Bundle(config, state, dict(metadata or {}))


def save_bundle(bundle: Bundle, path: str | Path) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a weights file."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "config": asdict(bundle.config),
        "metadata": bundle.metadata,
        "state_dict": bundle.state_dict,
    }
    if bundle.score_norm is not None and bundle.score_norm.enabled:
        payload["score_norm"] = bundle.score_norm.to_payload()
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the weights file's path")
    return save_atomically(payload, path)


def save_atomically(payload: Any, path: Path) -> Path:
    """``torch.save`` through a temp file and a rename, so a crash never leaves half a file. Any failure to write
    is an ``OSError`` naming ``path``: torch.save's own was a RuntimeError ("enforce fail at inline_container.cc")
    for a folder it may not write or a full disk, which the command line showed as a traceback."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        make_parent(path)
        with open(tmp, "wb") as fh:  # (not torch.save(payload, tmp): open's own error says what went wrong)
            torch.save(payload, fh)
        tmp.replace(path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # (no temp file where its folder could not be made)
            tmp.unlink(missing_ok=True)
        # a failed write, or one under torch's RuntimeError
        cause = exc.__context__ if isinstance(exc, RuntimeError) else exc
        if not isinstance(cause, OSError):
            raise
        raise type(cause)(f"cannot write {path}: {cause.strerror or cause}") from exc
    return path


def load_bundle(path: str | Path | None = None, check_version: bool = True) -> Bundle:
    """Load a bundle (the shipped default when ``path`` is None) without unpickling arbitrary objects.
    ``check_version=False`` is for `visage calibrate`, which gives the weights their version afresh."""
    path = Path(path) if path else DEFAULT_WEIGHTS
    if path.is_dir():
        raise WeightsError(f"{path} is a folder; give the weights file's path")
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:  # a bundle that cannot be read (permissions, I/O) is not "another kind of file"
        raise WeightsError(f"cannot read the weights file {path}: {exc.strerror or exc}") from exc
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same to the caller
        # (not torch's message: its advice to re-run with weights_only=False is not for our users)
        raise WeightsError(f"{path} is not a Visage weights bundle (torch.load: {type(exc).__name__}; a "
                           "damaged bundle, or another kind of file)") from exc
    if isinstance(payload, dict) and payload.get("format") != FORMAT and {"model", "opt", "epoch"} <= set(payload):
        raise WeightsError(f"{path} is a training checkpoint, not a weights bundle: `visage train --run-dir "
                           f"{path.parent} --export` makes a bundle of it")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a Visage weights bundle (expected format {FORMAT})")
    try:
        config = ModelConfig(**payload["config"])
        state_dict = payload["state_dict"]
    except (KeyError, TypeError) as exc:
        raise WeightsError(f"{path} is a damaged Visage bundle: {exc!r}") from exc
    config.validate()
    try:
        score_norm = CohortNorm.from_payload(payload.get("score_norm"), config.embedding_dim)
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path} has a damaged score cohort: {exc!r}") from exc
    bundle = Bundle(config, state_dict, payload.get("metadata") or {}, source=path, score_norm=score_norm)
    if check_version:
        _check_version_names_weights(bundle, path)
    return bundle


def _check_version_names_weights(bundle: Bundle, path: Path) -> None:
    """A model version ``<name>-<10 hex digits of the weights' digest>...`` must name these weights: the gallery
    and the FAISS index trust it, and weights changed under an old version were compared with the stored
    embeddings of the old ones, silently."""
    name, version = bundle.metadata.get("name"), bundle.metadata.get("model_version")
    if not (isinstance(name, str) and isinstance(version, str) and version.startswith(f"{name}-")):
        return
    claimed, actual = version[len(name) + 1 : len(name) + 11], bundle.weights_digest()[:10]
    if len(claimed) == 10 and all(c in "0123456789abcdef" for c in claimed) and claimed != actual:
        raise WeightsError(f"{path}: its weights are not the ones its model version {version} names (digest "
                           f"{actual}): a bundle changed after it was made; give it a version of its own with "
                           "`visage calibrate`")
