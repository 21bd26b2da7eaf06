"""Tiny random ViT / DINOv2 image classifiers and generated labelled images for the image-task tests."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessor, ViTModel

CLASSES = ("stripes", "dots")


def save_tiny_vision_model(directory: Path, kind: str = "dinov2", size: int = 16, seed: int = 0) -> Path:
    """A random 2-layer DINOv2 (or ViT) backbone, patch 4, with a ViT image processor resizing to ``size``."""
    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=size)
    if kind == "dinov2":
        Dinov2Model(Dinov2Config(**common, mlp_ratio=2)).save_pretrained(directory)
    else:
        ViTModel(ViTConfig(**common, intermediate_size=64), add_pooling_layer=False).save_pretrained(directory)
    ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(directory)
    return directory


def picture(label: str, index: int, size: int = 12, mode: str = "RGB") -> Image.Image:
    """Class ``stripes``: horizontal bright stripes; ``dots``: a bright checkerboard of dots (plus noise)."""
    generator = np.random.default_rng(index)
    pixels = generator.integers(0, 60, (size, size), dtype=np.uint8)
    if label == "stripes":
        pixels[::3, :] = 230
    else:
        pixels[::3, ::3] = 230
    image = Image.fromarray(pixels, mode="L")
    return image if mode == "L" else image.convert(mode)


def write_folder(root: Path, count: int, start: int = 0, size: int = 12) -> Path:
    """``root/<class>/<n>.png``: ``count`` images alternating between the classes."""
    for index in range(start, start + count):
        label = CLASSES[index % 2]
        (root / label).mkdir(parents=True, exist_ok=True)
        picture(label, index, size).save(root / label / f"{index}.png")
    return root


def write_table(path: Path, folder: Path, suffix: str = ".csv") -> Path:
    """A CSV / JSONL of ``image`` (path relative to the table) and ``label`` for every image of ``folder``."""
    rows = [{"image": os.path.relpath(file, path.parent), "label": file.parent.name}
            for file in sorted(folder.glob("*/*.png"))]
    if suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", "label"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
