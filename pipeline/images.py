"""Pictures in and out: finding and decoding image files, the formats a picture can be saved as, and the one
uint8 <-> [0, 1] float pair."""
import functools
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.errors import ConfigError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"}


def find_images(folder) -> list[Path]:
    """Every image file below `folder`, sorted; hidden files (temp files of a running writer) are left out."""
    return sorted(p for p in Path(folder).rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def load_image(path, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """H x W x 3 uint8 RGB of any still image (first frame of a GIF) and its H x W alpha, if any."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if img.width * img.height > max_pixels:
                raise ValueError(f"{img.width}x{img.height} is over crop.max_pixels={max_pixels}")
            img.seek(0)
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgba = np.asarray(img.convert("RGBA"))
                return np.ascontiguousarray(rgba[..., :3]), rgba[..., 3]
            return np.asarray(img.convert("RGB")), None


@functools.cache
def picture_suffixes() -> tuple[str, ...]:
    """The file extensions PIL writes an RGB picture as (each tried on a 2 x 2 picture in memory)."""
    Image.init()
    writable = []
    for suffix, fmt in sorted(Image.registered_extensions().items()):
        try:
            Image.new("RGB", (2, 2)).save(io.BytesIO(), format=fmt)
            writable.append(suffix)
        except Exception:  # no writer, no plugin installed, or not for RGB
            continue
    return tuple(writable)


def check_picture_name(key: str, path: Path) -> None:
    """A picture's file name that PIL can write (checked before the work that makes the picture)."""
    if path.suffix.lower() not in picture_suffixes():
        raise ConfigError(f"{key}={path}: {path.suffix or 'no extension'} is not a picture format this can write; "
                         f"end it in .png (lossless), or one of {' '.join(picture_suffixes())}")


def on_white(rgb: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """Composite over white, so transparent areas show as background rather than hidden colours."""
    if alpha is None:
        return rgb
    a = alpha[..., None].astype(np.float32) / 255
    return np.round(rgb * a + 255 * (1 - a)).astype(np.uint8)


def load_rgb(path, max_pixels: int) -> np.ndarray:
    return on_white(*load_image(path, max_pixels))


def to_float(images_uint8) -> torch.Tensor:
    """uint8 pixels (tensor or array, any device) -> float32 in [0, 1]."""
    images = torch.as_tensor(images_uint8)
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {images.dtype}")
    return images.float().div_(255)


def to_uint8(images01: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] -> uint8 pixels (rounded, clipped)."""
    return images01.mul(255).round_().clamp_(0, 255).byte()


def interleave_rows(top: torch.Tensor, bottom: torch.Tensor, nrow: int) -> torch.Tensor:
    """Rows of `nrow` images of `top`, each followed by the matching row of `bottom` (for a grid)."""
    rows = [torch.cat([top[i:i + nrow], bottom[i:i + nrow]]) for i in range(0, len(top), nrow)]
    return torch.cat(rows)
