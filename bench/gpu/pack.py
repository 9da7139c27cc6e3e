"""Pack what a GPU run of ``training/configs/gpu.toml`` needs into ``.gpu/payload`` (run here, from the repo root).

Why: the GPU machine gets this checkout plus 64 MiB of carried files, and nothing else: not ``../shared/data``,
not dlib, not the package's own dependencies. Everything the online-teacher recipe reads fits in ~55 MB:

- the source photos, re-encoded as WebP (quality 72; held-out photos 50, they only feed the device's own
  per-epoch validation: evaluate the result back here on the originals). The only lossy step;
- the manifests ``visage prepare`` wrote (landmarks, hashes), xz-compressed;
- dlib's descriptor network as float16 (descriptors within 6e-4 relative L2 of float32: bench/gpu/README.md);
- the teacher descriptors (online, only their mean is used: the centring vector) as float16;
- the teacher chip framings (found with dlib's landmark model, which stays here);
- beside it, in ``.gpu/wheels``, the wheels of the packages the device lacks (``wheels.py``).

Usage: VISAGE_WORK_DIR=... python bench/gpu/pack.py [QUALITY]
"""

from __future__ import annotations

import io
import lzma
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import wheels
from payload import CONFIG, PAYLOAD, answer_help
from PIL import Image

from training.config import load_config
from training.loop import load_split, load_views
from training.paths import shared_data, work_dir
from training.prepare import read_manifest
from training.teacher import teacher_network

OUT = PAYLOAD
VAL_QUALITY = 50


def webp(item: tuple[str, int]) -> bytes:
    path, quality = item
    b = io.BytesIO()
    Image.open(path).convert("RGB").save(b, "WEBP", quality=quality, method=6)
    return b.getvalue()


def main(quality: int) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    cfg = load_config(CONFIG, [])
    split = load_split(cfg, need_teacher=True)
    views = load_views(cfg, split.train)  # the chip framings (needs dlib)
    held_out = {(i.split("/")[0], s) for i, s in zip(split.val.identities, split.val.sources, strict=True)}
    blobs: list[bytes] = []
    for ns, folder in cfg.prepared.items():  # the order unpack.py reads them back in
        manifest = (work_dir() / folder / "manifest.csv").read_bytes()
        (OUT / f"manifest-{ns}.csv.xz").write_bytes(lzma.compress(manifest))
        rows = [r for r in read_manifest(work_dir() / folder) if r.status != "failed"]
        src = shared_data() / cfg.sources[ns]
        items = [(str(src / r.source), VAL_QUALITY if (ns, r.source) in held_out else quality) for r in rows]
        with ProcessPoolExecutor() as ex:
            blobs += list(ex.map(webp, items, chunksize=64))
    (OUT / "sources.webp.bin").write_bytes(b"".join(blobs))
    np.save(OUT / "sources.offsets.npy", np.cumsum([0] + [len(b) for b in blobs]))
    np.save(OUT / "train_chips.npy", views.teacher.astype(np.float64))  # in split.train's order
    with np.load(work_dir() / cfg.teacher_cache) as z:
        digests = np.frombuffer(b"".join(bytes.fromhex(k) for k in z["keys"]), np.uint8).reshape(-1, 32)
        np.savez(OUT / "teacher_cache16.npz", keys=digests, desc=z["desc"].astype(np.float16),
                 desc_flip=z["desc_flip"].astype(np.float16))
    state = teacher_network().state_dict()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, OUT / "teacher16.pt")
    (OUT / "pairs_dev.txt").write_bytes((shared_data() / cfg.pairs).read_bytes())
    sizes = {p.name: p.stat().st_size for p in sorted(OUT.iterdir())}
    print(sizes, f"total {sum(sizes.values()) / 2**20:.1f} MiB")
    wheels.main()


if __name__ == "__main__":
    answer_help(__doc__)
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 72)
