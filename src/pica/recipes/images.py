"""Labelled images for the ``image-classify`` task: reading, checking and turning them into pixels.

Three sources, each row ending as an *image example* ``{"image": str, "label": int | str,
"location": str, "path": str | None, "picture": PIL.Image.Image | None}``:

* **a folder per class** (``DIR/<class name>/<file>``), read with ``datasets``' ``imagefolder``
  builder (the class name is the label);
* **a CSV / JSONL / JSON list** of rows with an image path and a label (relative paths are
  relative to the data file's folder);
* **a ``datasets`` source** ``NAME[:CONFIG][@SPLIT]`` with an ``Image`` column (a ``ClassLabel``
  label becomes its class name).

Every image is opened and decoded when it is read, so an unreadable file, an image whose channels
cannot be converted without loss, or (with ``mode: null``) images with different channels are
refused before any training, naming the file and the row. Files are decoded again when turned into
pixels (:func:`pixel_array`), so a thousand photos are not all held in memory.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .data_files import DATA_SUFFIXES, iter_rows

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_FIELD_CANDIDATES", "MODES", "check_image", "image_label", "load_image_processor", "open_picture",
           "pixel_array", "read_image_examples"]

IMAGE_FIELD_CANDIDATES = ("image", "img", "path", "file", "filename", "image_path")
"""Columns tried, in order, for the image of a CSV/JSONL row or a datasets row (option ``image_field``)."""

MODES: dict[str, frozenset[str]] = {"RGB": frozenset({"1", "L", "P", "RGB"}), "L": frozenset({"1", "L"})}
"""Target PIL mode → the modes converted to it without losing information (grey → RGB repeats the
channel; a palette image without transparency is looked up). Other modes (alpha channels, CMYK,
16-bit and float images) are refused with the file named."""

_INT = re.compile(r"-?\d+")


def image_label(value: Any, location: str, field: str) -> int | str:
    """A class label: an int, or a non-empty string (a numeric string becomes an int).

    Raises:
        ValueError: naming ``location`` and ``field``: missing, empty, boolean, or a non-integral number.
    """
    if isinstance(value, bool):
        raise ValueError(f"{location}: label field {field!r} is a JSON boolean ({str(value).lower()}); write the "
                         "labels as class names or integers (e.g. \"yes\"/\"no\" or 1/0)")
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{location}: missing or empty label field {field!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        value = value.strip()
        return int(value) if _INT.fullmatch(value) else value
    raise ValueError(f"{location}: label field {field!r} must be a class name or an integer, got {value!r}")


def open_picture(path: str | os.PathLike, location: str):
    """Open and fully decode an image file.

    Raises:
        ValueError: naming ``location`` and the file: missing, not an image, truncated, or too large
            for PIL's decompression-bomb limit.
    """
    from PIL import Image

    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.copy() if handle.mode != "P" else handle.convert("RGBA" if "transparency" in handle.info
                                                                            else "RGB")
    except FileNotFoundError:
        raise ValueError(f"{location}: image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{location}: cannot read image {path}: {error}") from None


def check_image(picture: Any, location: str, name: str, mode: Optional[str], first: Optional[tuple[str, str]]) -> Any:
    """``picture`` converted to ``mode`` (None: as it is), or a ``ValueError`` naming the file and row.

    Args:
        picture: a decoded ``PIL.Image.Image``.
        location: the row (``file:line``, ``source[index]``) for messages.
        name: the image's file or identifier for messages.
        mode: target PIL mode (``"RGB"``, ``"L"``) or None to keep every image as it is.
        first: ``(mode, name)`` of the first image read, when ``mode`` is None (all must share its mode).

    Raises:
        ValueError: a mode that cannot be converted without loss (alpha, CMYK, 16-bit, float), or with
            ``mode`` None, a mode different from the first image's (mixed channels).
    """
    if mode is None:
        if first is not None and picture.mode != first[0]:
            raise ValueError(f"{location}: image {name} has mode {picture.mode} ({len(picture.getbands())} "
                             f"channel(s)) but the first image {first[1]} has mode {first[0]}: mixed channels; set "
                             "task option mode (e.g. \"RGB\") to convert every image")
        return picture
    if picture.mode not in MODES[mode]:
        raise ValueError(f"{location}: image {name} has mode {picture.mode} ({len(picture.getbands())} channel(s)), "
                         f"which cannot be converted to {mode} without losing information; convert the file first "
                         f"(convertible modes: {sorted(MODES[mode])})")
    return picture if picture.mode == mode else picture.convert(mode)


def _image_field(row: dict, given: Optional[str], location: str) -> str:
    if given is not None:
        if given not in row:
            raise ValueError(f"{location}: missing image field {given!r} (columns: {sorted(row)})")
        return given
    found = next((name for name in IMAGE_FIELD_CANDIDATES if name in row), None)
    if found is None:
        raise ValueError(f"{location}: no image column among {sorted(row)} (tried {list(IMAGE_FIELD_CANDIDATES)}); "
                         "set task option image_field")
    return found


def _folder_rows(folder: Path) -> Iterator[tuple[str, str, Any]]:
    """``(location, path, class name)`` of an image folder, through ``datasets``' ``imagefolder``."""
    from datasets import Image, load_dataset

    try:
        data = load_dataset("imagefolder", data_dir=str(folder), split="train")
    except Exception as error:  # no images, mixed layouts, split folders without "train"
        raise ValueError(f"{folder}: cannot read as an image folder (one sub-folder per class): {error}") from None
    if "label" not in data.features or not hasattr(data.features["label"], "names"):
        raise ValueError(f"{folder}: no class sub-folders found: an image folder needs one sub-folder per class "
                         "(DIR/<class>/<image>)")
    names = data.features["label"].names
    data = data.cast_column("image", Image(decode=False))
    for index, row in enumerate(data):
        path = row["image"]["path"]
        yield f"{folder} (image {index}: {path})", path, names[row["label"]]


def _table_rows(path: Path, options: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """``(location, image path, raw label)`` of a CSV/JSONL/JSON file of paths and labels."""
    label_field, field = options.get("label_field", "label"), options.get("image_field")
    for location, row in iter_rows(path, encoding=options.get("encoding", "utf-8")):
        field = _image_field(row, field, location)  # detected on the first row, then required
        value = row[field]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{location}: image field {field!r} must be a file path, got {value!r}")
        if label_field not in row:
            raise ValueError(f"{location}: missing label field {label_field!r}")
        image = Path(value.strip()).expanduser()
        yield location, str(image if image.is_absolute() else path.parent / image), row[label_field]


def _dataset_rows(source: str, options: dict[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    """``(location, decoded picture, label)`` of a ``datasets`` source ``NAME[:CONFIG][@SPLIT]``."""
    spec, _, split = source.partition("@")
    name, _, config = spec.partition(":")
    try:
        from datasets import load_dataset

        data = load_dataset(name, config or None, split=split or "train")
    except Exception as error:  # hub unreachable, unknown name, bad split
        raise ValueError(f"image-classify: cannot load {source!r} as a folder, a data file or a datasets source "
                         f"NAME[:CONFIG][@SPLIT]: {error}") from None
    label_field = options.get("label_field", "label")
    label_names = getattr(data.features.get(label_field), "names", None)
    field = options.get("image_field")
    for index, row in enumerate(data):
        location = f"{source}[{index}]"
        field = _image_field(row, field, location)  # detected on the first row, then required
        if label_field not in row:
            raise ValueError(f"{location}: missing label field {label_field!r}")
        label = row[label_field]
        if label_names is not None and isinstance(label, int) and 0 <= label < len(label_names):
            label = label_names[label]
        yield location, row[field], label


def read_image_examples(source: str | os.PathLike, options: dict[str, Any],
                        limit: Optional[int] = None) -> list[dict[str, Any]]:
    """Read, decode and check the labelled images of ``source`` (see the module docstring).

    Args:
        source: a folder per class, a ``.csv``/``.jsonl``/``.json`` file, or ``NAME[:CONFIG][@SPLIT]``.
        options: the task options (``image_field``, ``label_field``, ``mode``, ``encoding``).
        limit: read at most this many rows (in the source's order: class by class for a folder).

    Returns:
        Image examples ``{"image", "label", "location", "path", "picture"}``: ``path`` for files (decoded
        again later), ``picture`` (converted to ``mode``) for in-memory images of a datasets source.

    Raises:
        ValueError: naming the file and row of an unreadable image, a missing or bad label, an image with
            channels that cannot be converted, or mixed channels with ``mode: null``; an empty source.
        FileNotFoundError: a data file that does not exist.
    """
    mode = options.get("mode", "RGB")
    path = Path(source).expanduser()
    if path.is_dir():
        rows: Iterator[tuple[str, Any, Any]] = _folder_rows(path)
    elif path.exists() or path.suffix.lower() in DATA_SUFFIXES:
        rows = _table_rows(path, options)
    else:
        rows = _dataset_rows(str(source), options)
    examples: list[dict[str, Any]] = []
    first: Optional[tuple[str, str]] = None
    label_field = options.get("label_field", "label")
    for location, image, raw_label in rows:
        if limit is not None and len(examples) >= limit:
            break
        label = image_label(raw_label, location, label_field)
        if isinstance(image, str):
            name, picture = image, open_picture(image, location)
        else:
            name, picture = location, _in_memory_picture(image, location)
        picture = check_image(picture, location, name, mode, first)
        first = first or (picture.mode, name)
        examples.append({"image": name, "label": label, "location": location,
                         "path": image if isinstance(image, str) else None,
                         "picture": None if isinstance(image, str) else picture})
    if not examples:
        raise ValueError(f"image-classify: no images in {source}")
    return examples


def _in_memory_picture(value: Any, location: str):
    """A datasets image value (a decoded PIL image, or ``{"bytes", "path"}``) as a decoded PIL image."""
    import io

    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            return open_picture(io.BytesIO(value["bytes"]), location)
        return open_picture(value["path"], location)
    raise ValueError(f"{location}: the image column must hold images, got {type(value).__name__}")


def pixel_array(example: dict[str, Any], processor: Any, mode: Optional[str]) -> np.ndarray:
    """The processor's ``pixel_values`` of one example: ``(channels, height, width)`` float32.

    Files are decoded again here (and converted to ``mode``, as when they were read).
    """
    picture = example["picture"]
    if picture is None:
        picture = check_image(open_picture(example["path"], example["location"]), example["location"],
                              example["image"], mode, None)
    return np.asarray(processor(images=[picture], return_tensors="np")["pixel_values"][0], dtype=np.float32)


def load_image_processor(source: str, size: Optional[int] = None, **extra: Any):
    """``AutoImageProcessor`` of ``source``; with ``size``, set to resize every image to ``size × size``
    (no centre crop), checked on a blank image.

    Raises:
        ValueError: ``size`` not a positive integer, or a processor that does not produce
            ``size × size`` pixels when asked to.
    """
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(source, **extra)
    if size is None:
        return processor
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image-classify: task option size must be a positive integer (pixels), got {size!r}")
    processor.do_resize = True
    processor.size = {"height": size, "width": size}
    if getattr(processor, "do_center_crop", None):
        processor.do_center_crop = False
    shape = processor(images=[Image.new("RGB", (size + 3, size + 5))], return_tensors="np")["pixel_values"].shape
    if tuple(shape[-2:]) != (size, size):
        raise ValueError(f"image-classify: the image processor of {source} ({type(processor).__name__}) produced "
                         f"{tuple(shape[-2:])} pixels when set to size {size}; use a processor that resizes to "
                         "height × width")
    return processor
