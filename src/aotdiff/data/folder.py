"""Image folders and zip archives in EDM's dataset format (the output of EDM's `dataset_tool.py`).

Layout: image files (.png, .jpg, .jpeg, .bmp, .webp) anywhere below the root, read in the order of their relative
paths ('/'-separated, sorted as strings), plus an optional `dataset.json` at the root:

    {"labels": [["00000/img00000000.png", 6], ["00000/img00000001.png", 9], ...]}

with one non-negative integer class per image, or `{"labels": null}` for an unlabelled dataset.

Colour handling: grayscale ('L', '1') images give C = 1, RGB-like images ('RGB', 'P', 'CMYK', 'YCbCr') give C = 3.
An alpha channel ('RGBA', 'LA', transparent palettes) is dropped when every pixel is fully opaque and refused
otherwise, because flattening transparency needs a background colour only the user can choose. 16-bit and float
images are refused. macOS resource forks ('__MACOSX/', '._*') are skipped.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from .base import DatasetError, ImageDataset, check_labels, describe_resolutions, quoted

__all__ = ["IMAGE_EXTENSIONS", "load_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_CONVERT_TO_RGB = {"P", "CMYK", "YCbCr", "RGBX", "HSV", "LAB"}
_FIX_FORMAT = "re-save it as an 8-bit PNG (grayscale or RGB)"


def _is_image_name(relative: str) -> bool:
    base = relative.rsplit("/", 1)[-1]
    if relative.startswith("__MACOSX/") or base.startswith("._"):
        return False
    return base.lower().endswith(IMAGE_EXTENSIONS)


def _list_directory(root: Path) -> tuple[list[str], Callable[[str], bytes]]:
    names = []
    for folder, _, files in os.walk(root):
        for file in files:
            relative = (Path(folder) / file).relative_to(root).as_posix()
            names.append(relative)
    return names, lambda relative: (root / relative).read_bytes()


def _list_zip(archive: zipfile.ZipFile) -> tuple[list[str], Callable[[str], bytes]]:
    names = [info.filename for info in archive.infolist() if not info.is_dir()]
    return names, archive.read


def _drop_opaque_alpha(image: Image.Image, where: str) -> Image.Image:
    """`image` without its alpha band, which must be 255 everywhere (anything else would need a background)."""
    alpha = np.asarray(image.getchannel("A"))
    if alpha.min() < 255:
        raise DatasetError(
            f"{where} has transparent pixels (mode {image.mode}); flatten it onto a background colour and "
            "save it as RGB or grayscale"
        )
    return image.convert("L" if image.mode == "LA" else "RGB")


def _pixels(image: Image.Image, where: str) -> np.ndarray:
    """uint8 [C, H, W] for a decoded PIL image, following the colour rules in the module docstring."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = _drop_opaque_alpha(image.convert("RGBA") if image.mode == "PA" else image, where)
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode in _CONVERT_TO_RGB:
        image = image.convert("RGB")
    if image.mode not in ("L", "RGB"):
        raise DatasetError(f"{where} has unsupported pixel format (PIL mode {image.mode}); {_FIX_FORMAT}")
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _decode(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _pixels(image, where)
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(
            f"{where} is not a readable image ({type(error).__name__}: {error}); delete it or {_FIX_FORMAT}"
        ) from error


def _read_label_file(data: bytes, where: str, names: list[str]) -> tuple[np.ndarray | None, int]:
    """(labels aligned with `names` or None, num_classes) from the bytes of a dataset.json."""
    try:
        content = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{where} is not valid JSON ({error}); fix it or delete it") from error
    if not isinstance(content, dict) or "labels" not in content:
        raise DatasetError(f'{where} must be an object with a \'labels\' entry: {{"labels": [["file.png", 0], ...]}}')
    entries = content["labels"]
    if entries is None:
        return None, 0
    if not isinstance(entries, list):
        raise DatasetError(f"{where}: 'labels' must be a list of [file, class] pairs or null")
    by_name: dict[str, int] = {}
    for entry in entries:
        valid = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
        if not valid or not isinstance(entry[1], int) or isinstance(entry[1], bool):
            raise DatasetError(f'{where}: bad label entry {entry!r}; each entry must be ["path/file.png", class]')
        if entry[0] in by_name:
            raise DatasetError(f"{where}: file {quoted(entry[0])} is labelled twice; keep one entry per file")
        by_name[entry[0]] = entry[1]
    stray = [name for name in by_name if name not in set(names)]
    if stray:
        raise DatasetError(
            f"{where}: labels do not match the images: {len(stray)} label(s) for missing files, e.g. "
            f"{quoted(stray[0])}; remove those entries or add the files"
        )
    unlabelled = [name for name in names if name not in by_name]
    if unlabelled:
        raise DatasetError(
            f"{where}: labels do not match the images: {len(names)} images but {len(by_name)} labels; "
            f'no label for {quoted(unlabelled[0])}; give every image a label, or use {{"labels": null}}'
        )
    labels = check_labels([by_name[name] for name in names], len(names), where)
    return labels, int(labels.max()) + 1


def _check_shapes(arrays: list[np.ndarray], names: list[str], source: str) -> None:
    """Refuse non-square images, mixed resolutions and mixed channel counts, naming example files."""
    for array, name in zip(arrays, names):
        if array.shape[1] != array.shape[2]:
            raise DatasetError(
                f"{source}: {quoted(name)} is {array.shape[1]}x{array.shape[2]} (height x width) but images must be "
                "square; crop or pad every image to square"
            )
    sizes = [(a.shape[1], a.shape[2]) for a in arrays]
    if len(set(sizes)) > 1:
        odd = next(i for i, size in enumerate(sizes) if size != sizes[0])
        raise DatasetError(
            f"{source} holds images of {describe_resolutions(sizes)}: {quoted(names[0])} is "
            f"{sizes[0][0]}x{sizes[0][1]} but {quoted(names[odd])} is {sizes[odd][0]}x{sizes[odd][1]}; "
            "resize them all to one resolution (or pass --resolution to EDM's dataset_tool.py)"
        )
    channels = [a.shape[0] for a in arrays]
    if len(set(channels)) > 1:
        odd = next(i for i, c in enumerate(channels) if c != channels[0])
        kind = {1: "grayscale", 3: "RGB"}
        raise DatasetError(
            f"{source} mixes grayscale and RGB images: {quoted(names[0])} is {kind[channels[0]]} but "
            f"{quoted(names[odd])} is {kind[channels[odd]]}; convert them all to one colour mode"
        )


def _read_all(names: list[str], read: Callable[[str], bytes], describe: Callable[[str], str]) -> Iterator[np.ndarray]:
    for name in names:
        yield _decode(read(name), describe(name))


def load_image_folder(path: str | os.PathLike[str]) -> ImageDataset:
    """All images in the folder or .zip `path` (EDM dataset format) as an ImageDataset, labelled when the root
    holds a dataset.json with labels."""
    path = Path(path)
    source = quoted(path)
    if path.is_dir():
        names, read = _list_directory(path)
        return _assemble(names, read, source, lambda name: quoted(path / name), path.name)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DatasetError(f"{source} is not a readable zip archive ({error}); re-create it with `zip -r`") from error
    with archive:
        names, read = _list_zip(archive)
        return _assemble(names, read, source, lambda name: f"{source} member {quoted(name)}", path.stem)


def _assemble(
    all_names: list[str], read: Callable[[str], bytes], source: str, describe: Callable[[str], str], title: str
) -> ImageDataset:
    names = sorted(name for name in all_names if _is_image_name(name))
    if not names:
        raise DatasetError(
            f"{source} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} files in all subfolders); "
            "point it at a folder or zip of images"
        )
    labels, num_classes = None, 0
    if "dataset.json" in all_names:  # checked first: cheap, and a mismatch makes decoding pointless
        labels, num_classes = _read_label_file(read("dataset.json"), describe("dataset.json"), names)
    arrays = list(_read_all(names, read, describe))
    _check_shapes(arrays, names, source)
    return ImageDataset(np.stack(arrays), labels, num_classes, title)
