"""Service settings: one pydantic-settings class, every field overridable by a ``VISAGE_*`` environment
variable.

The defaults must start a working service with nothing configured (shipped weights, ``./data``, a flat index),
so every default here is also the documented default in docs/SERVICE.md.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.files import private_dir
from model.decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, PILLOW_MAX_PIXELS, DecodeLimits
from model.errors import validation_problems

IndexType = Literal["flat", "hnsw", "ivf"]
KEY_FILE = "api_key"
FAILURES_CSV = "enroll_failures.csv"  # visage enroll's list of failed files


class Settings(BaseSettings):
    """Everything the service and the ``serve``/``enroll``/``reindex`` commands read from the environment."""

    model_config = SettingsConfigDict(env_prefix="VISAGE_", extra="ignore", frozen=True)

    data_dir: Path = Field(Path("data"), description="SQLite store, FAISS index, API key file (relative to cwd)")
    host: str = Field("127.0.0.1", description="address `visage serve` binds")
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port (`visage serve` picks it, to announce it)
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes (each loads the model)")
    weights: Path | None = Field(None, description="weights bundle; empty = the shipped default bundle")
    flip: bool = Field(True, description="average each face with its mirror image (2 forward passes)")
    backend: Literal["onnx", "torch"] = Field(
        "onnx", description="run the embedder through ONNX Runtime (same vectors, ~3x faster) or PyTorch"
    )
    index_type: IndexType = Field("flat", description="flat (exact), hnsw or ivf (approximate, large galleries)")
    hnsw_m: int = Field(32, ge=4, le=256)
    hnsw_ef_search: int = Field(128, ge=8, le=4096)
    ivf_nlist: int = Field(1024, ge=1, le=1 << 20)
    ivf_nprobe: int = Field(320, ge=1, le=1 << 20)
    faiss_threads: int = Field(
        1, ge=0, le=256, description="FAISS OpenMP threads; 0 = FAISS's default (all cores). One query at a time "
        "searches fastest on one thread: at 1M faces flat 22.5 ms vs 71 ms with 2 (docs/BENCHMARKS.md section 4)"
    )
    blas_threads: int = Field(
        1, ge=0, le=256, description="threads of numpy's and scipy's BLAS (cohort scores); 0 = its default (all "
        "cores). Its idle threads spin and took a core from MTCNN: /verify p50 95-98 ms with 2, 79-86 ms with 1 "
        "under OMP_WAIT_POLICY=PASSIVE, 60-66 ms with 1 and the policy unset (docs/BENCHMARKS.md section 3)"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted X-API-Key values, comma separated; empty = key file"
    )
    metrics_require_key: bool = Field(False, description="ask for the API key on /metrics too")
    max_upload_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1024, description="largest accepted image file")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=10_000, le=PILLOW_MAX_PIXELS, description="largest accepted width x height"
    )
    default_far: str = Field("1e-3", description="false-accept rate whose calibrated threshold is the default")
    store_images: bool = Field(True, description="keep enrolled originals so `visage reindex` can re-embed")
    min_enroll_quality: float = Field(
        0.0, ge=0.0, le=1.0, description="refuse to enroll a face whose quality (detection score, scaled down for "
        "faces under 80 px) is below this: a tiny or doubtful face in the gallery spoils every later match of its "
        "subject; 0 enrolls every face found"
    )
    inference_threads: int = Field(
        1, ge=1, le=64, description="images processed at once per worker, each on its own OS thread; 1 keeps the "
        "/verify latency and memory targets on 2 cores; 2 served ~30% more requests/s at 16 clients for ~40 MiB "
        "more and a slower single request (p50 ~105 ms; docs/BENCHMARKS.md section 6)"
    )
    max_pending_images: int = Field(
        32, ge=1, le=100_000, description="image requests a worker admits at once, running or waiting for the "
        "model; more are refused with 503 overloaded and Retry-After: 1 (each holds its upload in memory: 32 x "
        "20 MiB at most)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="uvicorn's and Visage's log level"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text lines, or one JSON object a line for log collectors; both carry the request id"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("weights", mode="before")
    @classmethod
    def _empty_weights(cls, value: object) -> object:
        return None if value in ("", None) else value

    @property
    def db_path(self) -> Path:
        return self.data_dir / "visage.db"

    @property
    def index_path(self) -> Path:
        return self.data_dir / "index.faiss"

    @property
    def key_path(self) -> Path:
        return self.data_dir / KEY_FILE

    @property
    def failures_path(self) -> Path:
        return self.data_dir / FAILURES_CSV

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(max_bytes=self.max_upload_bytes, max_pixels=self.max_pixels)

    @property
    def max_request_bytes(self) -> int:
        """Whole request body: two images (``/compare``) plus form fields."""
        return 2 * self.max_upload_bytes + 1024 * 1024


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment and ``overrides`` (a command's options: ``port`` is ``--port``). A bad value
    is one ValueError line naming each option or variable it came from, what it held and what it should be
    (pydantic's own message takes three lines a field, with a web link)."""
    def source(loc: tuple) -> str:
        field = "_".join(map(str, loc))
        return f"--{field.replace('_', '-')}" if field in overrides else f"VISAGE_{field.upper()}"

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ValueError(f"invalid settings: {validation_problems(exc.errors(), source)}") from None


def resolve_api_keys(settings: Settings) -> tuple[list[str], bool]:
    """The configured keys, or the key stored in the data folder (created on first use).

    Returns ``(keys, generated)``; ``generated`` is True when this call wrote a new key file. Creation is
    race-free (write a temp file, then hard-link it into place) so several workers agree on one key.
    """
    if settings.api_keys:
        return list(settings.api_keys), False
    path = settings.key_path
    if path.is_file() and path.read_text().strip():
        return [path.read_text().strip()], False
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)
        generated = True
    except FileExistsError:
        generated = False  # another worker won the race: use its key
    finally:
        tmp.unlink(missing_ok=True)
    return [path.read_text().strip()], generated
