"""``visage prepare``: a folder-per-identity photo set -> aligned 112x112 crops + a manifest.

Every source image ends up in the manifest exactly once, as ``detected``, ``fallback`` (no face found: the
centred face region is used, as the LFW protocol allows) or ``failed`` (unreadable), never silently dropped.
Re-running skips what is done, so an interrupted run resumes where it stopped; an image whose file changed since
its row was written (replaced, repaired, re-downloaded) is redone, failed or not.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from PIL import Image

from model.decode import IMAGE_SUFFIXES
from model.processes import interrupts_deferred

MANIFEST = "manifest.csv"
SETTINGS = "prepare.json"  # the --pad the crops were made with
CANVAS_GREY = (128, 128, 128)
# Median MTCNN landmarks on 300 LFW/CelebA crops, as fractions of the crop (measured with this detector):
# where a centred face's eyes, nose and mouth corners lie when the detector finds nothing.
CENTRED_LANDMARKS = np.array(
    [[0.3717, 0.4282], [0.6374, 0.4211], [0.5056, 0.5815], [0.393, 0.7112], [0.6283, 0.704]]
)
CHUNK = 32
DEFAULT_PAD = 0.28  # grey margin around each photo for the detector, as a share of its size (``--pad``)


@dataclass
class ManifestRow:
    crop: str  # relative to DST
    identity: str
    source: str  # relative to SRC
    sha256: str
    status: str  # detected / fallback / failed
    score: float
    reason: str
    # the 5 landmarks the crop was aligned on, in source-image pixels ("x1 y1 ... x5 y5"): lets training
    # re-warp the source with extra geometry (augmentation, the teacher's own framing) consistently
    landmarks: str = ""


def list_images(src: Path) -> list[tuple[str, str]]:
    """(identity, relative path) of every image under ``src/<identity>/``, sorted."""
    items = []
    for ident in sorted(p for p in src.iterdir() if p.is_dir()):
        for f in sorted(ident.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                items.append((ident.name, str(f.relative_to(src))))
    return items


REQUIRED_COLUMNS = frozenset(f for f in ManifestRow.__dataclass_fields__ if f != "landmarks")  # (older: none)


def read_manifest(dst: Path) -> list[ManifestRow]:
    """The rows of ``dst``'s manifest; one written by something else, or damaged mid-file, is a ``ValueError``
    naming the file and line (they were TypeError / KeyError tracebacks in every later prepare, eval or train)."""
    path = dst / MANIFEST
    if not path.exists():
        return []
    rows = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:  # empty: a first run stopped before its first row
            return []
        if not set(reader.fieldnames) >= REQUIRED_COLUMNS:
            raise ValueError(f"{path} is not a manifest written by `visage prepare` (its columns: "
                             f"{', '.join(reader.fieldnames)}): give another destination")
        for row in reader:
            try:
                if None in row or None in row.values():  # more or fewer fields than the header
                    raise ValueError("wrong number of fields")
                rows.append(ManifestRow(**{**row, "score": float(row["score"])}))
            except ValueError as exc:
                raise ValueError(f"{path}, line {reader.line_num}, is damaged ({exc}): delete that line and run "
                                 "`visage prepare` again to redo its image") from None
    # a resumed run appends a new row when it redoes an image (crop lost): the latest row wins
    return list({r.source: r for r in rows}.values())


def _drop_torn_row(path: Path) -> None:
    """A crash (power, a killed process) mid-write leaves the last row without its newline: the next run appended
    onto it and damaged the manifest for good. The torn row goes; its image is redone."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        fh.seek(0)
        fh.truncate(fh.read().rfind(b"\n") + 1)


def _write_manifest(path: Path, rows: list[ManifestRow]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ManifestRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    tmp.replace(path)


def _pad(image: Image.Image, pad: float) -> tuple[Image.Image, int, int]:
    """Paste on a grey canvas ``pad`` x size larger on each side: tight crops give MTCNN no context."""
    w, h = image.size
    ox, oy = round(w * pad), round(h * pad)
    if ox == 0 and oy == 0:
        return image, 0, 0
    canvas = Image.new("RGB", (w + 2 * ox, h + 2 * oy), CANVAS_GREY)
    canvas.paste(image, (ox, oy))
    return canvas, ox, oy


_detector = None


def _init_worker() -> None:
    global _detector
    # Ctrl-C is the parent's to handle; a forked worker inherits the parent's deferring handler, a spawned
    # (forkserver: Python 3.14's default) one Python's own, which printed a traceback from every worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (not the parent's, inherited by a fork): a plain stop
    from model.processes import stop_with_parent

    stop_with_parent()  # a parent killed outright left its workers running for good, holding its stdout
    import torch

    from model.detect import FaceDetector

    torch.set_num_threads(1)
    _detector = FaceDetector()


def crop_from_source(image: Image.Image, source_points: np.ndarray, pad: float = DEFAULT_PAD) -> np.ndarray:
    """The aligned crop ``prepare`` writes, from a photo and the landmarks its manifest records (source pixels)."""
    from model.align import CROP_SIZE, align_face

    canvas, ox, oy = _pad(image, pad)
    return align_face(canvas, np.asarray(source_points, dtype=np.float64) + np.array([ox, oy]), CROP_SIZE)


def align_or_centre(images: list[Image.Image], detector, pad: float) -> list[tuple[np.ndarray, str, float, np.ndarray]]:
    """Aligned crop, status, score and landmarks (source-image pixels) for each image: the detected face
    nearest the centre, or the centred face region when there is none (the LFW protocol's fallback; counted
    by every caller)."""
    from model.align import CROP_SIZE, align_face

    padded = [_pad(img, pad) for img in images]
    detections = detector.detect_batch([c for c, _, _ in padded])
    out = []
    for img, (canvas, ox, oy), faces in zip(images, padded, detections, strict=True):
        w, h = img.size
        centre = np.array([ox + w / 2, oy + h / 2])
        if faces:
            face = min(faces, key=lambda f: float(np.sum((np.array(f.box).reshape(2, 2).mean(0) - centre) ** 2)))
            landmarks, status, score = face.landmarks, "detected", face.score
        else:
            landmarks = CENTRED_LANDMARKS * np.array([w, h]) + np.array([ox, oy])
            status, score = "fallback", 0.0
        landmarks = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
        source_points = landmarks - np.array([ox, oy])
        out.append((align_face(canvas, landmarks, CROP_SIZE), status, round(float(score), 4), source_points))
    return out


def _process_chunk(args: tuple[str, str, list[tuple[str, str]], float]) -> list[dict]:
    from model.decode import decode_image
    from model.errors import VisageError

    src, dst, items, pad = args
    rows, images, metas = [], [], []
    for ident, rel in items:
        path = Path(src) / rel
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        try:
            images.append(decode_image(data))
            metas.append((ident, rel, sha))
        except VisageError as exc:
            rows.append(asdict(ManifestRow("", ident, rel, sha, "failed", 0.0, exc.detail)))
    aligned = align_or_centre(images, _detector, pad)
    for (crop, status, score, points), (ident, rel, sha) in zip(aligned, metas, strict=True):
        crop_rel = f"{rel}.png"  # the whole name: x.jpg and x.png beside each other must not share one crop
        out = Path(dst) / "crops" / crop_rel
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(out)
        reason = "no face detected: centred face region used" if status == "fallback" else ""
        marks = " ".join(f"{v:.2f}" for v in points.ravel())
        rows.append(asdict(ManifestRow(f"crops/{crop_rel}", ident, rel, sha, status, score, reason, marks)))
    return rows


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


@dataclass
class PrepareSummary:
    total: int
    done_before: int
    detected: int
    fallback: int
    failed: int
    failed_now: int  # of the images this run tried: a re-run retries earlier failures only if their file changed
    manifest: str
    changed: int = 0  # images redone because their file changed since their row was written


def prepare(src: str | Path, dst: str | Path, workers: int | None = None, pad: float = DEFAULT_PAD,
            progress: bool = True, only: set[str] | None = None) -> PrepareSummary:
    """Align every image under ``src`` (or only those whose relative paths are in ``only``) into ``dst``;
    resumable and idempotent: a later call with other images adds them to the same manifest."""
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder not found: {src}")
    if not 0.0 <= pad <= 1.0:  # (also refuses nan)
        raise ValueError(f"pad is a share of the image from 0 to 1, got {pad}")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} is a file: the destination must be a folder")
    if src.resolve() in (dst.resolve(), *dst.resolve().parents):  # its crops would be photos of the next run
        raise ValueError(f"the destination {dst} is inside the source {src}: the next run would read its crops as "
                         "photos of an identity; choose a folder outside the source")
    images = list_images(src)
    if not images:  # a mistyped path or layout must not end as "0 images, success"
        raise FileNotFoundError(f"no images in {src}: expected one folder per identity, {src}/<name>/<photo>.jpg")
    dst.mkdir(parents=True, exist_ok=True)
    _check_pad(dst, pad)
    manifest = dst / MANIFEST
    _drop_torn_row(manifest)
    existing = read_manifest(dst)
    if existing and "landmarks" not in manifest.open().readline():
        _write_manifest(manifest, existing)  # written before the landmarks column: upgrade the header in place
    wanted = {rel for _, rel in images if only is None or rel in only}
    changed = _changed_sources(src, [r for r in existing if r.source in wanted], progress)
    done = {r.source for r in existing
            if (r.status == "failed" or (dst / r.crop).exists()) and r.source not in changed}
    todo = [it for it in images if it[1] not in done and it[1] in wanted]
    new_file = not manifest.exists() or manifest.stat().st_size == 0
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    with manifest.open("a", newline="") as fh, ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
        writer = csv.DictWriter(fh, fieldnames=list(ManifestRow.__dataclass_fields__))
        if new_file:
            writer.writeheader()
            fh.flush()
        jobs = [(str(src), str(dst), chunk, pad) for chunk in _chunks(todo, CHUNK)]
        # Ctrl-C is the parent's to handle (it stops handing out chunks and keeps the manifest). The workers
        # start inside submit() and inherit a handler that only takes note: without it each printed its own
        # KeyboardInterrupt traceback. A Ctrl-C the parent gets meanwhile is raised once all are submitted.
        futures: list[Future] = []
        written = 0
        try:
            with interrupts_deferred():
                futures = [pool.submit(_process_chunk, job) for job in jobs]
            with tqdm(total=len(todo), desc="aligning", unit="img", disable=not progress) as bar:
                for future in futures:
                    rows = future.result()
                    writer.writerows(rows)
                    fh.flush()  # each finished chunk is durable: a crash loses at most the chunks in flight
                    written += 1
                    bar.update(len(rows))
        except KeyboardInterrupt:
            for future in futures[written:]:  # no new chunk starts; the ones in flight finish, their rows kept
                future.cancel()
            _keep_finished(futures[written:], writer, fh)
            raise  # (the pool's exit then joins its manager thread: shutdown(wait=False) here left it running at
            # interpreter exit, where 3.11's _python_exit could write to its closed wakeup pipe: a traceback)
    rows = read_manifest(dst)
    counts = {s: sum(r.status == s for r in rows) for s in ("detected", "fallback", "failed")}
    attempted = {source for _, source in todo}
    failed_now = sum(r.status == "failed" and r.source in attempted for r in rows)
    return PrepareSummary(len(rows), len(done), counts["detected"], counts["fallback"], counts["failed"], failed_now,
                          str(manifest), len(changed))


def _changed_sources(src: Path, rows: list[ManifestRow], progress: bool = False) -> set[str]:
    """Sources whose bytes no longer hash to what their row recorded: reusing those rows gave `visage eval` the old
    picture's crop (a replaced image scored as before) and kept a repaired image failed for good. Hashing is a
    small part of what a re-run saves: LFW's 10,562 photos (71 MB) took 12 s at the lowest priority beside a
    training run, where decoding and detecting them takes minutes."""
    from tqdm import tqdm

    changed = set()
    for row in tqdm(rows, desc="checking done images", unit="img", disable=not progress or not rows):
        path = src / row.source
        if not path.is_file():
            continue  # (not listed any more: not redone, and its row stays)
        with path.open("rb") as fh:
            if hashlib.file_digest(fh, "sha256").hexdigest() != row.sha256:
                changed.add(row.source)
    return changed


def _keep_finished(futures: list[Future], writer: csv.DictWriter, fh: TextIO) -> None:
    """On an interrupt, the manifest rows of the chunks still in flight, once they finish: their crops were
    written, but without their rows a re-run redid them (up to three chunks of 32 images)."""
    for future in futures:
        if future.cancelled():
            continue
        try:
            rows = future.result()
        except Exception:  # noqa: BLE001 - a chunk that failed is redone by the next run, as before
            continue
        writer.writerows(rows)
        fh.flush()


def _check_pad(dst: Path, pad: float) -> None:
    """Crops of one folder share one framing: a resumed or extended run with another ``--pad`` would have mixed
    them (and kept the old ones) silently. The pad is recorded on the first run (folders from before this record
    take the pad of their next run)."""
    record = dst / SETTINGS
    if record.exists():
        saved = json.loads(record.read_text()).get("pad")
        if saved is not None and not math.isclose(saved, pad):
            raise ValueError(f"{dst} holds crops made with --pad {saved}: use --pad {saved} to add to it, or another "
                             "destination for crops with another pad")
        return
    record.write_text(json.dumps({"pad": pad}) + "\n")
