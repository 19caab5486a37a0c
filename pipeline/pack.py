"""Stage 3: deduplicate face tiles, split them train/test and pack each split into one uint8 array.

${pack.faces_dir}/**/*.{png,jpg,...} -> ${pack.train_file}, ${pack.test_file} (N x 3 x size x size uint8)
plus splits.json beside them (which file went where, and what was dropped).
"""
import hashlib
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from pipeline.config import Paths, checked, key
from pipeline.errors import PipelineError, exit_on_error
from pipeline.images import find_images, load_rgb
from pipeline.io import after_write_error, atomic_write_all

log = logging.getLogger(__name__)


@dataclass
class PackConfig:
    """The keys of conf/pack/default.yaml, their types and ranges."""
    faces_dir: str = key()
    size: int = key(low=8)
    test_fraction: float = key(low=1e-6, high=0.999)
    near_dup_bits: int = key(low=-1, high=64)
    drop_near_duplicates: bool = key()
    train_file: str = key()
    test_file: str = key()


@dataclass
class PackJob:
    paths: Paths = key(default=Paths)
    crop: dict = key()  # only for pack.size's default, ${crop.size} (checked as pack.size)
    pack: PackConfig = key(default=PackConfig)


class PackError(PipelineError):
    pass


def load_tile(path: Path, size: int) -> np.ndarray | None:
    """3 x size x size uint8, or None for a file that cannot be decoded."""
    try:
        rgb = load_rgb(path, max_pixels=Image.MAX_IMAGE_PIXELS or 2 ** 31)
    except Exception as err:  # a broken tile is reported and left out; the others still pack
        log.warning("skipping %s: %s", path, err)
        return None
    if rgb.shape[:2] != (size, size):
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def dhash(tiles: np.ndarray) -> np.ndarray:
    """64-bit difference hash per tile (grey 9x8, is each pixel brighter than its left neighbour)."""
    grey = tiles.astype(np.float32).mean(axis=1)
    small = np.stack([cv2.resize(g, (9, 8), interpolation=cv2.INTER_AREA) for g in grey])
    bits = (small[:, :, 1:] > small[:, :, :-1]).reshape(len(tiles), 64)
    return np.packbits(bits, axis=1).view(">u8").reshape(-1).astype(np.uint64)


def near_duplicate_groups(hashes: np.ndarray, max_bits: int, chunk: int = 1024) -> np.ndarray:
    """Group label per hash: hashes within `max_bits` Hamming distance share a group (transitively)."""
    parent = np.arange(len(hashes))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if max_bits >= 0:
        for start in range(0, len(hashes), chunk):
            block = hashes[start:start + chunk, None] ^ hashes[None, :]
            rows, cols = np.nonzero(np.bitwise_count(block) <= max_bits)
            for i, j in zip(rows + start, cols):
                if i < j:
                    a, b = root(i), root(j)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(len(hashes))])


def is_test_group(key: str, test_fraction: float) -> bool:
    """Deterministic, order-free split: a group's content hash decides its side."""
    return int(key[:12], 16) / 16 ** 12 < test_fraction


def array_writer(array: np.ndarray):
    return lambda f: np.save(f, array)


def unique_tiles(kept: list[tuple[Path, np.ndarray]], faces_dir: Path) -> tuple[np.ndarray, list, list]:
    """Tiles with exact duplicates (same decoded pixels) removed, their file names and content digests."""
    unique, names, digests = {}, [], []
    for path, tile in kept:
        digest = hashlib.sha1(tile.tobytes()).hexdigest()
        if digest not in unique:
            unique[digest] = tile
            names.append(path.relative_to(faces_dir).as_posix())
            digests.append(digest)
    return np.stack(list(unique.values())) if unique else np.empty(0), names, digests


def split(groups: np.ndarray, digests: list[str], cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which tiles are kept, and the train / test indices: whole near-duplicate groups go to one side,
    chosen by a hash of the group's content."""
    group_key = {}
    for g, digest in zip(groups, digests):
        group_key[g] = min(group_key.get(g, digest), digest)
    keep = np.ones(len(groups), bool)
    if cfg.drop_near_duplicates:
        keep[:] = False
        keep[np.unique(groups, return_index=True)[1]] = True
    test = np.array([is_test_group(group_key[g], cfg.test_fraction) for g in groups])
    return keep, np.nonzero(keep & ~test)[0], np.nonzero(keep & test)[0]


def check_split_sizes(unique: int, groups: int, train: int, test: int, test_fraction: float) -> None:
    """Training needs faces on both sides; nothing is written otherwise (earlier splits stay as they are)."""
    if train and test:
        return
    raise PackError(f"{unique} unique faces ({groups} near-duplicate groups) split into {train} train / {test} "
                    f"test at pack.test_fraction={test_fraction}: both splits need faces. At this fraction "
                    f"that takes about {math.ceil(3 / test_fraction)} groups or more (each lands in test with "
                    f"probability {test_fraction}); add faces or raise pack.test_fraction")


def pack(cfg: DictConfig) -> dict:
    faces_dir = Path(cfg.faces_dir)
    files = find_images(faces_dir)
    if not files:
        raise PackError(f"no face tiles in pack.faces_dir={faces_dir}; run the crop stage "
                        "(python -m pipeline.crop) or point pack.faces_dir at a folder of face images")
    with ThreadPoolExecutor() as pool:
        loaded = list(pool.map(lambda p: load_tile(p, cfg.size), files))
    kept = [(f, t) for f, t in zip(files, loaded) if t is not None]
    unreadable = len(files) - len(kept)
    tiles, names, digests = unique_tiles(kept, faces_dir)
    if not len(tiles):
        raise PackError(f"none of the {len(files)} files in {faces_dir} could be decoded as an image")
    groups = near_duplicate_groups(dhash(tiles), cfg.near_dup_bits)
    keep, train_idx, test_idx = split(groups, digests, cfg)
    check_split_sizes(len(tiles), len(np.unique(groups)), len(train_idx), len(test_idx), cfg.test_fraction)

    summary = {
        "faces_dir": str(faces_dir), "files": len(files), "unreadable": unreadable,
        "exact_duplicates": len(kept) - len(tiles), "unique": len(tiles),
        "near_duplicate_groups": int(len(np.unique(groups))),
        "near_duplicates_dropped": int((~keep).sum()), "train": len(train_idx), "test": len(test_idx),
        "train_files": [names[i] for i in train_idx], "test_files": [names[i] for i in test_idx],
    }
    splits = json.dumps(summary, ensure_ascii=False).encode()
    with after_write_error("train.npy, test.npy and splits.json are as they were (the three are replaced together "
                           "or not at all); once that is fixed, run the same command again"):
        atomic_write_all({cfg.train_file: array_writer(tiles[train_idx]), cfg.test_file: array_writer(tiles[test_idx]),
                          Path(cfg.train_file).parent / "splits.json": lambda f: f.write(splits)})
    log.info("pack done: %d files, %d unreadable, %d exact duplicates removed, %d unique "
             "(%d near-duplicate groups, %d dropped) -> train %d %s, test %d %s",
             len(files), unreadable, summary["exact_duplicates"], len(tiles),
             summary["near_duplicate_groups"], summary["near_duplicates_dropped"],
             len(train_idx), cfg.train_file, len(test_idx), cfg.test_file)
    return summary


@hydra.main(config_path="../conf", config_name="pack", version_base="1.3")
@exit_on_error
def main(cfg: DictConfig) -> None:
    pack(checked(cfg, PackJob).pack)


if __name__ == "__main__":
    main()
