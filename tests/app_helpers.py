"""Helpers for the app tests: hand-made unit vectors, a fake (fast, deterministic) face pipeline, and a real
uvicorn server in a subprocess on a free loopback port."""

from __future__ import annotations

import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from app.gallery import Gallery
from app.index import IndexConfig
from app.store import Store, SubjectRef
from model.bundle import Bundle
from model.decode import DecodeLimits
from model.detect import DetectedFace
from model.faces import FacePipeline
from model.score_norm import CohortNorm

REPO = Path(__file__).resolve().parents[1]
DIM = 8
V1, V2 = "model-v1", "model-v2"  # model versions of hand-made galleries


def unit(*values: float, dim: int = DIM) -> np.ndarray:
    """A unit vector from its first few coordinates (the rest zero)."""
    v = np.zeros(dim, dtype=np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


def near(base: np.ndarray, angle: float, axis: int = DIM - 1) -> np.ndarray:
    """``base`` turned by ``angle`` radians towards ``axis``: cosine similarity cos(angle) to ``base``."""
    other = np.zeros_like(base)
    other[axis] = 1.0
    v = np.cos(angle) * base + np.sin(angle) * other
    return (v / np.linalg.norm(v)).astype(np.float32)


# -- a fake pipeline: real decoding and alignment, fake detector and network ------------------------------------


def png(*colors: tuple[int, int, int], width: int | None = None, fmt: str = "PNG") -> bytes:
    """One 100 px square per colour on a grey canvas, left to right; ``FakeDetector`` finds exactly those.
    ``width`` changes the bytes (and the canvas) without changing the faces."""
    img = Image.new("RGB", (width or 120 * len(colors) + 20, 140), (128, 128, 128))
    for i, color in enumerate(colors):
        img.paste(Image.new("RGB", (100, 100), color), (20 + 120 * i, 20))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


RED, BLUE, GREEN = (220, 40, 40), (40, 40, 220), (40, 200, 40)


class FakeDetector:
    """Finds the 100 px squares drawn by ``png`` (any pixel that is not background grey), largest first."""

    def detect(self, image: Image.Image) -> list[DetectedFace]:
        arr = np.asarray(image).astype(int)
        mask = (np.abs(arr - 128).sum(axis=2) > 10).any(axis=0)
        faces, x = [], 0
        while x < len(mask):
            if mask[x]:
                start = x
                while x < len(mask) and mask[x]:
                    x += 1
                box = (float(start), 20.0, float(x), 120.0)
                cx, w = (box[0] + box[2]) / 2, box[2] - box[0]
                marks = np.array([[cx - w * 0.17, 55], [cx + w * 0.17, 55], [cx, 72], [cx - w * 0.13, 95],
                                  [cx + w * 0.13, 95]], dtype=np.float64)
                faces.append(DetectedFace(box, 0.999, marks))
            x += 1
        return sorted(faces, key=lambda f: f.area, reverse=True)


@dataclass
class FakeBundle:
    version: str
    thresholds: dict[str, float] = field(default_factory=lambda: {"1e-3": 0.9, "1e-4": 0.95})

    @property
    def model_version(self) -> str:
        return self.version

    calibrated_far = Bundle.calibrated_far  # the real lookup ("0.001" is "1e-3") over the fake's thresholds

    def threshold(self, far: str = "1e-3") -> float:
        return self.thresholds.get(far, 0.5)

    @property
    def scorer(self) -> CohortNorm:
        return CohortNorm.plain(DIM)  # plain cosine: the hand-made colour directions keep their known scores


class FakeEmbedder:
    """Embedding = the crop's mean colour as a direction: same colour, same person."""

    def __init__(self, version: str = "fake-v1", dim: int = DIM) -> None:
        self.bundle = FakeBundle(version)
        self.dim = dim
        self.calls = 0

    @property
    def model_version(self) -> str:
        return self.bundle.version

    def embed(self, crops: np.ndarray) -> np.ndarray:
        self.calls += 1
        crops = np.asarray(crops, dtype=np.float32).reshape(len(crops), -1, 3)
        out = np.zeros((len(crops), self.dim), dtype=np.float32)
        out[:, :3] = crops.mean(axis=1) - 128.0
        out[:, 3] = 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def fake_pipeline(version: str = "fake-v1", limits: DecodeLimits | None = None) -> FacePipeline:
    """Real decoding and alignment; the fake detector and embedder make each call cost microseconds."""
    return FacePipeline(FakeEmbedder(version), FakeDetector(), limits)  # type: ignore[arg-type]


# -- a real server -------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The service in a subprocess on 127.0.0.1 with its own data dir: ``uvicorn app.main:create_app --factory``,
    or ``visage serve`` with ``cli=True`` (then, with no key configured, the key is read from its output)."""

    def __init__(self, data_dir: Path, api_key: str | None = "test-key", env: dict[str, str] | None = None,
                 cli: bool = False) -> None:
        self.data_dir, self.api_key, self.cli = data_dir, api_key, cli
        self.env = {**os.environ, "VISAGE_DATA_DIR": str(data_dir), "VISAGE_LOG_LEVEL": "warning", **(env or {})}
        self.env.pop("VISAGE_API_KEYS", None)
        if api_key:
            self.env["VISAGE_API_KEYS"] = api_key
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = data_dir.parent / f"{data_dir.name}-server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        if self.cli:
            command = [sys.executable, "-m", "model.console", "serve", "--port", str(self.port)]
        else:
            command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
                       "--port", str(self.port), "--log-level", "warning"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2)
                if r.status_code == 200:
                    if self.api_key is None:
                        self.api_key = self.printed_key()
                    return self
                if "failed to load" in r.text:
                    raise RuntimeError(r.text)
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def printed_key(self) -> str:
        for line in self.log.read_text().splitlines():
            if line.startswith("API key") and "(not printed" not in line:  # (a later start names only the file)
                return line.rsplit(": ", 1)[1].strip()
        raise AssertionError(f"no API key printed:\n{self.log.read_text()[-2000:]}")

    def client(self, key: str | None = "default", timeout: float = 120.0) -> httpx.Client:
        headers = {"X-API-Key": self.api_key if key == "default" else key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self) -> None:
        """Graceful: SIGTERM, as an orchestrator would; the index is saved on the way out."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def post_image(client: httpx.Client, path: str, data: bytes, name: str = "image.jpg",
               **form: Any) -> httpx.Response:
    return client.post(path, files={"image": (name, data)}, data={k: str(v) for k, v in form.items()})


# -- hand-made galleries (real SQLite files and FAISS indexes) ---------------------------------------------


def add(store: Store, name: str, vector: np.ndarray, image: bytes | None = None, version: str = V1,
        sha: str | None = None) -> int:
    sha = sha or f"sha-{name}-{vector.tobytes().hex()[:16]}"
    face, _, _ = store.add_face(SubjectRef(name=name), sha, image, vector, version, (0, 0, 10, 10), 0.9)
    return face.id


def open_gallery(tmp_path, kind: str = "flat", version: str = V1) -> Gallery:
    gallery = Gallery(Store(tmp_path / "visage.db"), tmp_path / "index.faiss", version, DIM, IndexConfig(kind=kind))
    gallery.open()
    return gallery


def concurrently(work: Callable[[int], None], n: int, join_s: float = 30.0) -> None:
    """``work(0)`` ... ``work(n - 1)`` on n threads at once; returns when all have ended (or ``join_s`` passed)."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(join_s)


@contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """Another process holding SQLite's write lock on the gallery meanwhile (a stuck batch, a backup tool that
    writes): readers go on in WAL mode, writers wait out the busy timeout."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()
