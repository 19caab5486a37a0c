"""Stage 2: find anime faces with lbpcascade_animeface and save them as square PNG tiles.

${crop.input_dir}/**/*.{jpg,png,gif,webp,...} -> ${crop.output_dir}/<source>_<k>.png + manifest.jsonl
Sources already handled (listed in sources.jsonl) are skipped on a rerun.
"""
import hashlib
import logging
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import cv2
import hydra
import numpy as np
import requests
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from pipeline.config import Paths, checked, key
from pipeline.errors import PipelineError, exit_on_error
from pipeline.images import find_images, load_image, on_white
from pipeline.io import JsonlLog, atomic_write, atomic_write_bytes, read_jsonl

log = logging.getLogger(__name__)



@dataclass
class CropConfig:
    """The keys of conf/crop/default.yaml, their types and ranges."""
    input_dir: str = key()
    output_dir: str = key()
    cascade: str = key()
    cascade_sha256: str | None = key()
    cascade_cache_dir: str = key()
    scale_factor: float = key(low=1.0001)
    min_neighbors: int = key(low=0)
    min_size: int = key(low=1)
    margin: float = key(low=0)
    size: int = key(low=8)
    max_pixels: int = key(low=1)
    workers: int | None = key(low=1)


@dataclass
class CropJob:
    paths: Paths = key(default=Paths)
    crop: CropConfig = key(default=CropConfig)


class CropError(PipelineError):
    pass


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve_cascade(cfg) -> Path:
    """Local path to the cascade XML: `cfg.cascade` itself, or the URL downloaded once and verified."""
    source = str(cfg.cascade)
    if not source.startswith(("http://", "https://")):
        path = Path(source)
        if not path.is_file():
            raise CropError(f"crop.cascade={source} does not exist; pass the path of "
                            "lbpcascade_animeface.xml or leave crop.cascade at its upstream URL")
        return path
    path = Path(cfg.cascade_cache_dir) / Path(source).name
    if path.is_file() and sha256_of(path) == cfg.cascade_sha256:
        return path
    log.info("downloading the cascade from %s", source)
    try:
        resp = requests.get(source, timeout=60)
        resp.raise_for_status()
    except requests.RequestException as err:
        raise CropError(f"could not download the cascade from {source} ({err}); offline, pass a "
                        "local copy: crop.cascade=/path/to/lbpcascade_animeface.xml") from err
    digest = hashlib.sha256(resp.content).hexdigest()
    if digest != cfg.cascade_sha256:
        raise CropError(f"the cascade from {source} has sha256 {digest}, expected "
                        f"{cfg.cascade_sha256}; nothing was saved. Check crop.cascade and crop.cascade_sha256")
    atomic_write_bytes(path, resp.content)
    return path


def load_cascade(path) -> cv2.CascadeClassifier:
    try:
        cascade = cv2.CascadeClassifier(str(path))
    except (cv2.error, SystemError):  # OpenCV raises on some malformed XML instead of returning empty
        cascade = None
    if cascade is None or cascade.empty():
        raise CropError(f"{path} is not a valid OpenCV cascade (empty or corrupt XML); "
                        "get lbpcascade_animeface.xml again or point crop.cascade at the upstream URL")
    return cascade


def detect_faces(cascade, rgb: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (x, y, w, h) and neighbour counts, exactly as the upstream example detects them."""
    grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    boxes, neighbours = cascade.detectMultiScale2(
        grey, scaleFactor=cfg.scale_factor, minNeighbors=cfg.min_neighbors,
        minSize=(cfg.min_size, cfg.min_size))
    return np.asarray(boxes, dtype=int).reshape(-1, 4), np.asarray(neighbours, dtype=int).reshape(-1)


def square_crop_box(box, margin: float, width: int, height: int) -> tuple[int, int, int]:
    """(x, y, side) of a square around `box` grown by `margin`, moved inside the image (and shrunk if needed)."""
    x, y, w, h = box
    side = min(int(round(max(w, h) * (1 + 2 * margin))), width, height)
    cx, cy = x + w / 2, y + h / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, side


def tile_stem(source: Path, input_dir: Path) -> str:
    """Readable and unique per source (a.jpg and a.png, or "a b" and "a_b", must not collide)."""
    rel = source.relative_to(input_dir).as_posix()
    readable = re.sub(r"[^\w-]+", "_", str(Path(rel).with_suffix("")))
    return f"{readable}_{hashlib.sha1(rel.encode()).hexdigest()[:6]}"


_worker = {}


def _init_worker(cascade_path: str) -> None:
    cv2.setNumThreads(1)
    _worker["cascade"] = load_cascade(cascade_path)


def crop_one(source: Path, cfg, input_dir: Path, output_dir: Path) -> dict:
    """Detect, crop and save the faces of one image; returns its sources.jsonl row with the tiles."""
    row = {"source": source.relative_to(input_dir).as_posix(), "bytes": file_size(source), "tiles": []}
    try:
        rgb, alpha = load_image(source, cfg.max_pixels)
    except Exception as err:  # any undecodable (or vanished) file is skipped with its reason; the run goes on
        return {**row, "status": "skipped", "reason": f"{type(err).__name__}: {err}"}
    # detect on the stored colours, as upstream's cv2.imread does; cut tiles from the composited image
    boxes, neighbours = detect_faces(_worker["cascade"], rgb, cfg)
    rgb = on_white(rgb, alpha)
    height, width = rgb.shape[:2]
    for k, (box, n) in enumerate(zip(boxes, neighbours)):
        left, top, side = square_crop_box(box, cfg.margin, width, height)
        tile = cv2.resize(rgb[top:top + side, left:left + side], (cfg.size, cfg.size),
                          interpolation=cv2.INTER_AREA)
        name = f"{tile_stem(source, input_dir)}_{k}.png"
        atomic_write(output_dir / name, partial(_save_png, tile))
        row["tiles"].append({"tile": name, "box": [int(v) for v in box], "crop": [left, top, side],
                             "neighbours": int(n)})
    return {**row, "status": "ok", "faces": len(row["tiles"])}


def file_size(path: Path) -> int | None:
    """Its size, or None when it vanished since it was listed (it is then skipped, not an error)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _save_png(rgb: np.ndarray, file) -> None:
    Image.fromarray(rgb).save(file, format="PNG")


def source_urls(input_dir: Path) -> dict[str, str]:
    """file -> URL from the scraper's index, when the input folder is the scraper's."""
    return {row["file"]: row["url"] for row in read_jsonl(input_dir / "index.jsonl")
            if row.get("kind") == "image" and row.get("status") == "ok"}


def crop(cfg: DictConfig) -> dict:
    cfg = SimpleNamespace(**OmegaConf.to_container(cfg, resolve=True))  # cheap to send to workers
    input_dir, output_dir = Path(cfg.input_dir), Path(cfg.output_dir)
    if not input_dir.is_dir():
        raise CropError(f"crop.input_dir={input_dir} is not a folder; run `make data` (scrape) first "
                        "or point crop.input_dir at a folder of images")
    cascade_path = resolve_cascade(cfg)
    load_cascade(cascade_path)  # fail here, once, rather than in every worker
    output_dir.mkdir(parents=True, exist_ok=True)
    done = {(r["source"], r["bytes"]) for r in read_jsonl(output_dir / "sources.jsonl")}
    todo = [p for p in find_images(input_dir)
            if (p.relative_to(input_dir).as_posix(), file_size(p)) not in done]
    urls = source_urls(input_dir)
    workers = cfg.workers or os.cpu_count()
    log.info("cropping %d new images from %s (%d done before) with %d processes",
             len(todo), input_dir, len(done), workers)
    totals = {"images": 0, "faces": 0, "skipped": 0}
    with JsonlLog(output_dir / "manifest.jsonl") as manifest, \
            JsonlLog(output_dir / "sources.jsonl") as sources, \
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                                initializer=_init_worker, initargs=(str(cascade_path),)) as pool:
        job = partial(crop_one, cfg=cfg, input_dir=input_dir, output_dir=output_dir)
        for row in tqdm(pool.map(job, todo, chunksize=4), total=len(todo), desc="crop", unit="img"):
            for tile in row.pop("tiles"):
                manifest.append({**tile, "source": row["source"], "url": urls.get(row["source"])})
            sources.append(row)
            totals["images"] += 1
            totals["faces"] += row.get("faces", 0)
            if row["status"] == "skipped":
                totals["skipped"] += 1
                log.warning("skipped %s: %s", row["source"], row["reason"])
    log.info("crop done: %d images, %d faces, %d unreadable images skipped -> %s",
             totals["images"], totals["faces"], totals["skipped"], output_dir)
    return totals


@hydra.main(config_path="../conf", config_name="crop", version_base="1.3")
@exit_on_error
def main(cfg: DictConfig) -> None:
    crop(checked(cfg, CropJob).crop)


if __name__ == "__main__":
    main()
