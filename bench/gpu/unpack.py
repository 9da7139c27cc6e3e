"""On the GPU machine: rebuild from ``.gpu/payload`` the work dir the trainer reads (prepared crops, the decoded
photos cache, the teacher centring and chip framings), under $VISAGE_WORK_DIR and $VISAGE_SHARED_DATA."""

from __future__ import annotations

import io
import lzma
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from payload import CONFIG, PAYLOAD, answer_help
from PIL import Image


def decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def crop(item: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The aligned crop ``visage prepare`` made (at its default pad), from the photo and the recorded landmarks."""
    from training.prepare import crop_from_source

    image, marks = item
    return crop_from_source(Image.fromarray(image), marks)


def main() -> None:
    from training.config import load_config
    from training.data import _parse_landmarks, sources_cache_path
    from training.loop import CHIPS_CACHE, SOURCES_CACHE, load_split
    from training.paths import shared_data, work_dir
    from training.prepare import read_manifest
    from training.sampler import PKSampler
    from training.teacher import save_chip_matrices

    t0, work, shared = time.time(), work_dir(), shared_data()
    cfg = load_config(CONFIG, [])
    (shared / cfg.pairs).parent.mkdir(parents=True, exist_ok=True)
    (shared / cfg.pairs).write_bytes((PAYLOAD / "pairs_dev.txt").read_bytes())
    blob, off = (PAYLOAD / "sources.webp.bin").read_bytes(), np.load(PAYLOAD / "sources.offsets.npy")
    with ProcessPoolExecutor(os.cpu_count()) as ex:
        images = list(ex.map(decode, [blob[off[i]:off[i + 1]] for i in range(len(off) - 1)], chunksize=128))
    where: dict[tuple[str, str], int] = {}
    for ns, folder in cfg.prepared.items():
        d = work / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.csv").write_bytes(lzma.decompress((PAYLOAD / f"manifest-{ns}.csv.xz").read_bytes()))
        rows = [r for r in read_manifest(d) if r.status != "failed"]
        first = len(where)
        where.update({(ns, r.source): first + i for i, r in enumerate(rows)})
        items = [(images[first + i], _parse_landmarks(r.landmarks)) for i, r in enumerate(rows)]
        with ProcessPoolExecutor(os.cpu_count()) as ex:
            crops = list(ex.map(crop, items, chunksize=64))
        np.save(d / "crops.npy", np.stack(crops))  # written after the manifest: load_prepared trusts it
    if len(where) != len(images):
        raise SystemExit(f"payload holds {len(images)} photos, the manifests {len(where)}")
    with np.load(PAYLOAD / "teacher_cache16.npz") as z:
        np.savez(work / cfg.teacher_cache, keys=np.array([bytes(k).hex() for k in z["keys"]]),
                 desc=z["desc"].astype(np.float32), desc_flip=z["desc_flip"].astype(np.float32))
    split = load_split(cfg, need_teacher=True)
    train = [(i.split("/")[0], s) for i, s in zip(split.train.identities, split.train.sources, strict=True)]
    # the caches training.loop.load_views reads (load_sources, teacher_chip_matrices), as they would write them
    photos = sources_cache_path(split.train.sha256, work / SOURCES_CACHE)
    photos.parent.mkdir(parents=True, exist_ok=True)
    np.save(photos, np.stack([images[where[k]] for k in train]))
    chips = np.load(PAYLOAD / "train_chips.npy")
    if len(chips) != len(train):
        raise SystemExit(f"payload holds {len(chips)} chip framings for {len(train)} training photos")
    paths = [str((shared / cfg.sources[ns] / s).resolve()) for ns, s in train]
    save_chip_matrices(work / CHIPS_CACHE, paths, chips)
    (work / "steps_per_epoch").write_text(str(len(PKSampler(split.train.labels, cfg.p, cfg.k))))
    print(f"unpacked {len(images)} photos: {len(train)} training, {len(split.val.crops)} held out, "
          f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    answer_help(__doc__)
    main()
