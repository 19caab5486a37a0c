"""Hair colour from the pixels of a face tile, without tags.

The crop stage's tiles (lbpcascade_animeface's box, no margin) put the bangs across the top rows and the
side locks down both edges; HAIR_REGION is that band. Five colour statistics of its pixels in CIELAB
(pure-white background left out): the median and 80th percentile of lightness, the mean a* and b* of its
most colourful 40%, and the median chroma, so outlines and shading do not decide the hue. A linear
classifier over them (hair_colours.json: a logistic regression fitted by bench/hair_labeller.py to the
faces labelled by eye in tests/hair_labels.tsv) names one colour of PALETTE.
"""
import json
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

MODEL_FILE = Path(__file__).with_name("hair_colours.json")
FEATURES = ("lightness_median", "lightness_p80", "a_colourful", "b_colourful", "chroma_median")


def hair_region(size: int) -> np.ndarray:
    """size x size bool mask: the bangs (rows 1-13 of 64, columns 8-55) and the side locks (rows 6-43,
    columns 1-7 and 56-62), scaled to the tile size."""
    mask = np.zeros((64, 64), bool)
    mask[1:14, 8:56] = True
    mask[6:44, 1:8] = True
    mask[6:44, 56:63] = True
    if size == 64:
        return mask
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)


def hair_features(tiles_uint8: np.ndarray, batch: int = 2048) -> np.ndarray:
    """N x 5 colour statistics (FEATURES) of the hair region of uint8 N x 3 x H x H tiles."""
    return np.concatenate([batch_features(np.asarray(tiles_uint8[i:i + batch])) for i in
                           range(0, len(tiles_uint8), batch)]) if len(tiles_uint8) else np.zeros((0, len(FEATURES)))


def batch_features(tiles: np.ndarray) -> np.ndarray:
    n, _, size, _ = tiles.shape
    rgb = np.ascontiguousarray(tiles.transpose(0, 2, 3, 1)).reshape(-1, size, 3)
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(n, size, size, 3)[:, hair_region(size)].astype(np.float32)
    lightness, a, b = lab[..., 0], lab[..., 1] - 128, lab[..., 2] - 128
    chroma = np.hypot(a, b)
    kept = ~((lightness > 240) & (chroma < 6))  # the white page behind the face, not hair
    kept[kept.sum(1) < 0.3 * kept.shape[1]] = True  # mostly white: white (silver) hair, keep it all
    masked = [np.where(kept, v, np.nan) for v in (lightness, chroma)]
    colourful = masked[1] >= np.nanquantile(masked[1], 0.6, axis=1, keepdims=True)
    return np.stack([np.nanmedian(masked[0], 1), np.nanquantile(masked[0], 0.8, axis=1),
                     (a * colourful).sum(1) / colourful.sum(1), (b * colourful).sum(1) / colourful.sum(1),
                     np.nanmedian(masked[1], 1)], 1)


@lru_cache(maxsize=1)
def hair_model() -> dict:
    model = json.loads(MODEL_FILE.read_text(encoding="utf-8"))
    return {k: np.asarray(v) if isinstance(v, list) and k != "classes" else v for k, v in model.items()}


PALETTE = tuple(hair_model()["classes"])


def label_hair(tiles_uint8: np.ndarray) -> np.ndarray:
    """The hair colour (a PALETTE name) of each uint8 N x 3 x H x H tile."""
    model = hair_model()
    scaled = (hair_features(tiles_uint8) - model["mean"]) / model["scale"]
    return np.asarray(model["classes"])[np.argmax(scaled @ model["coef"].T + model["intercept"], 1)]
