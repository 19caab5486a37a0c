"""Stage 2: find anime faces with lbpcascade_animeface and save them as square PNG tiles.

${crop.input_dir}/**/*.{jpg,png,gif,webp,...} -> ${crop.output_dir}/<source>_<k>.png + manifest.jsonl
Sources already handled (listed in sources.jsonl) are skipped on a rerun.
"""
import hashlib
import logging
import math
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import cv2
import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from pipeline.config import Paths, checked, key
from pipeline.errors import PipelineError, exit_on_error
from pipeline.faces import DetectorConfig, face_tiles, load_cascade, resolve_cascade
from pipeline.images import find_images, load_image
from pipeline.io import JsonlLog, after_write_error, atomic_write, read_jsonl, remove_partial_files, writing

log = logging.getLogger(__name__)


@dataclass
class CropConfig(DetectorConfig):
    """The keys of conf/crop/default.yaml, their types and ranges (the detector's in pipeline/faces.py)."""
    input_dir: str = key()
    output_dir: str = key()
    workers: int | None = key(low=1)


@dataclass
class CropJob:
    paths: Paths = key(default=Paths)
    crop: CropConfig = key(default=CropConfig)


class CropError(PipelineError):
    pass


def tile_stem(source: Path, input_dir: Path) -> str:
    """Readable and unique per source (a.jpg and a.png, or "a b" and "a_b", must not collide)."""
    rel = source.relative_to(input_dir).as_posix()
    readable = re.sub(r"[^\w-]+", "_", str(Path(rel).with_suffix("")))
    return f"{readable}_{hashlib.sha1(rel.encode()).hexdigest()[:6]}"


_worker = {}
CHUNK = 4  # images a worker takes at a time


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
    for k, face in enumerate(face_tiles(_worker["cascade"], rgb, alpha, cfg)):
        name = f"{tile_stem(source, input_dir)}_{k}.png"
        atomic_write(output_dir / name, partial(_save_png, face.pop("tile")))
        row["tiles"].append({"tile": name, **face})
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


@contextmanager
def mapper(workers: int, cascade_path: Path):
    """map() over the images: a pool of `workers` processes, or this process for one chunk of images or
    fewer (starting a pool costs seconds)."""
    if workers <= 1:
        _worker["cascade"] = load_cascade(cascade_path)
        yield map
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                               initializer=_init_worker, initargs=(str(cascade_path),))
    try:
        yield partial(pool.map, chunksize=CHUNK)
    finally:  # after a failure (a full disk), the images not started are not cropped in vain
        pool.shutdown(cancel_futures=True)


def crop(cfg: DictConfig) -> dict:
    with after_write_error("every face tile and manifest row written before is kept (a picture counts as done only "
                           "once all its tiles are written); once that is fixed, run the same command again: it "
                           "crops only the pictures not done"):
        return crop_folder(SimpleNamespace(**OmegaConf.to_container(cfg, resolve=True)))  # cheap to send to workers


def crop_folder(cfg: SimpleNamespace) -> dict:
    input_dir, output_dir = Path(cfg.input_dir), Path(cfg.output_dir)
    if not input_dir.is_dir():
        raise CropError(f"crop.input_dir={input_dir} is not a folder; run `make data` (scrape) first "
                        "or point crop.input_dir at a folder of images")
    cascade_path = resolve_cascade(cfg)
    load_cascade(cascade_path)  # fail here, once, rather than in every worker
    with writing(output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
    if removed := remove_partial_files(output_dir):
        log.info("removed %d partial tiles left by a killed run in %s", removed, output_dir)
    done = {(r["source"], r["bytes"]) for r in read_jsonl(output_dir / "sources.jsonl")}
    todo = [p for p in find_images(input_dir)
            if (p.relative_to(input_dir).as_posix(), file_size(p)) not in done]
    urls = source_urls(input_dir)
    workers = min(cfg.workers or os.cpu_count(), math.ceil(len(todo) / CHUNK))
    log.info("cropping %d new images from %s (%d done before) with %d processes",
             len(todo), input_dir, len(done), max(1, workers))
    totals = {"images": 0, "faces": 0, "skipped": 0}
    with JsonlLog(output_dir / "manifest.jsonl") as manifest, \
            JsonlLog(output_dir / "sources.jsonl") as sources, \
            mapper(workers, cascade_path) as mapped:
        job = partial(crop_one, cfg=cfg, input_dir=input_dir, output_dir=output_dir)
        for row in tqdm(mapped(job, todo), total=len(todo), desc="crop", unit="img"):
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
