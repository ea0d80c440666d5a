"""Real photographs for image models: a folder of files, or the photographs installed with scikit-image
and matplotlib (``builtin``), and deterministic augmented copies of them for retrieval."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

BUILTIN = "builtin"
# scikit-image's real photographs that its wheel ships (no download), then matplotlib's sample photograph
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "hubble_deep_field")


@dataclass
class Photo:
    name: str
    image: Image.Image  # RGB

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def builtin_photos() -> list[Photo]:
    """Eight real photographs: scikit-image's (astronaut, cat, coffee, rocket, cameraman, coins, the
    Hubble deep field) and matplotlib's portrait of Grace Hopper."""
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError("the built-in photographs come with scikit-image: pip install 'cardhouse[vision]'") from e
    from matplotlib import cbook

    photos = [Photo(name, Image.fromarray(getattr(skimage.data, name)()).convert("RGB")) for name in SKIMAGE_PHOTOS]
    hopper = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with Image.open(hopper) as image:
        photos.append(Photo("grace_hopper", image.convert("RGB")))
    return photos


def _open(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # reads the pixels now: a truncated file fails here, not later
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        warnings.warn(f"skipping {path.name}: not a readable image ({type(e).__name__}: {e})")
        return None


def load_images(source: str | Path = BUILTIN, *, limit: int | None = None, min_size: int = 1) -> list[Photo]:
    """``builtin``, an image file or a folder of them (sorted by name; unreadable files are skipped with a
    warning). Every image must be at least ``min_size`` pixels wide and high (one patch of the model)."""
    if str(source) == BUILTIN:
        photos = builtin_photos()
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"image folder or file not found: {source} (or use 'builtin')")
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) \
            if path.is_dir() else [path]
        photos = [Photo(p.stem, image) for p in files if (image := _open(p)) is not None]
        if not photos:
            raise ValueError(f"no readable image in {source} ({len(files)} file(s) tried)")
    photos = photos[:limit] if limit else photos
    small = [f"{p.name} ({p.size[0]}x{p.size[1]})" for p in photos if min(p.size) < min_size]
    if small:
        raise ValueError(f"image smaller than one {min_size}x{min_size} patch of the model: {', '.join(small)}")
    return photos


def augmented(photo: Photo, copies: int = 4) -> list[Photo]:
    """Deterministic augmented copies (flip, crop, rotation, colour and contrast changes): the gallery of
    the retrieval measure, where each copy should find the other copies of its own photograph."""
    image, (w, h) = photo.image, photo.size
    changes = [
        ("flip", lambda: ImageOps.mirror(image)),
        ("crop", lambda: image.crop((w // 10, h // 12, w - w // 8, h - h // 10))),
        ("rotate", lambda: image.rotate(12, resample=Image.BICUBIC, expand=False, fillcolor=(128, 128, 128))),
        ("colour", lambda: ImageEnhance.Contrast(ImageEnhance.Color(image).enhance(0.4)).enhance(1.4)),
        ("dark-crop", lambda: ImageEnhance.Brightness(image.crop((0, 0, w * 4 // 5, h * 4 // 5))).enhance(0.6)),
    ]
    if not 1 <= copies <= len(changes):
        raise ValueError(f"copies must be 1..{len(changes)}, got {copies}")
    return [Photo(f"{photo.name}:{name}", make()) for name, make in changes[:copies]]
