"""Draws docs/consistent_views.png: what the student and the teacher see in one batch of consistent views.

    VISAGE_WORK_DIR=... python docs/make_views_figure.py [--out docs/consistent_views.png]

Top row: the student's 112 px views (serving alignment + augmentation); bottom row: the teacher's 150 px chips
of the same augmented photos (dlib's framing); the last columns are mixup blends.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from model.preprocess import MEAN, STD
from training.config import load_config
from training.loop import load_split, load_views
from training.views import ViewAugment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/consistent_views.png"))
    ap.add_argument("--config", default="training/configs/online.toml")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. 'prepared={lfw=\"prepared/lfw\"}'")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    faces = load_split(cfg, need_teacher=False).train
    faces = faces.subset(np.arange(len(faces)) < 400)
    views = load_views(cfg, faces, progress=False)
    idx = np.random.default_rng(3).choice(len(faces), 8, replace=False)
    x, chips, mixed = views.draw(idx, 112, ViewAugment(mixup=0.25), torch.Generator().manual_seed(5))
    order = np.argsort(mixed.numpy(), kind="stable")
    student = (x[order] * STD + MEAN).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    teacher = chips[order].clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    pad, cell, margin = 8, 150, 120
    sheet = Image.new("RGB", (margin + len(idx) * (cell + pad) + pad, 2 * (cell + pad) + pad + 18), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, pad + cell // 2 - 12), "student view\n112 px, serving\nalignment", fill="black")
    draw.text((8, 2 * pad + cell + cell // 2 - 12), "teacher view\n150 px, dlib's\nchip framing", fill="black")
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        left = margin + pad + i * (cell + pad)
        sheet.paste(Image.fromarray(s), (left + (cell - 112) // 2, pad + (cell - 112) // 2))
        sheet.paste(Image.fromarray(t), (left, 2 * pad + cell))
        if mixed[order][i]:
            draw.text((left + 50, 2 * (cell + pad) + 4), "mixup", fill="black")
    sheet.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
