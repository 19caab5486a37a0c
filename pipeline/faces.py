"""Finding anime faces in a picture with lbpcascade_animeface, as the upstream example does, and cutting
them out as square tiles. Shared by the crop stage (folders of images) and the explorer (uploads)."""
import contextlib
import copy
import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import requests
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.config import key
from pipeline.errors import PipelineError
from pipeline.images import on_white
from pipeline.io import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class DetectorConfig:
    """The detector's keys of the crop config group (conf/crop/default.yaml)."""
    cascade: str = key()
    cascade_sha256: str | None = key()
    cascade_cache_dir: str = key()
    scale_factor: float = key(low=1.0001)
    min_neighbors: int = key(low=0)
    min_size: int = key(low=1)
    margin: float = key(low=0)
    size: int = key(low=8)
    max_pixels: int = key(low=1)


def only_detector_keys(cfg: DictConfig) -> DictConfig:
    """`cfg` with its crop group narrowed to the detector's keys (a stage that only detects faces has no
    input/output folders to crop)."""
    detector = set(OmegaConf.structured(DetectorConfig).keys())
    narrowed = copy.deepcopy(cfg)
    with open_dict(narrowed):
        narrowed.crop = OmegaConf.masked_copy(cfg.crop, [k for k in cfg.crop if k in detector])
    return narrowed


class CascadeError(PipelineError):
    pass


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve_cascade(cfg, copies=(), timeout: float = 60) -> Path:
    """Local path to the cascade XML: `cfg.cascade` itself when it is a path; for a URL, the copy cached in
    cascade_cache_dir (with the pinned sha256), else the first of `copies` there is (an export folder's:
    the detector it was exported with), else the URL downloaded once and verified."""
    source = str(cfg.cascade)
    if not source.startswith(("http://", "https://")):
        path = Path(source)
        if not path.is_file():
            raise CascadeError(f"crop.cascade={source} does not exist; pass the path of "
                            "lbpcascade_animeface.xml or leave crop.cascade at its upstream URL")
        return path
    path = Path(cfg.cascade_cache_dir) / Path(source).name
    if path.is_file() and sha256_of(path) == cfg.cascade_sha256:
        return path
    for copy_path in map(Path, copies):
        if copy_path.is_file():
            return copy_path
    log.info("downloading the cascade from %s", source)
    try:
        resp = requests.get(source, timeout=timeout)
        resp.raise_for_status()
    except requests.RequestException as err:
        raise CascadeError(f"could not download the cascade from {source} ({err}); offline, pass a "
                        "local copy: crop.cascade=/path/to/lbpcascade_animeface.xml") from err
    digest = hashlib.sha256(resp.content).hexdigest()
    if digest != cfg.cascade_sha256:
        raise CascadeError(f"the cascade from {source} has sha256 {digest}, expected "
                        f"{cfg.cascade_sha256}; nothing was saved. Check crop.cascade and crop.cascade_sha256")
    atomic_write_bytes(path, resp.content)
    return path


def load_cascade(path) -> cv2.CascadeClassifier:
    try:
        cascade = cv2.CascadeClassifier(str(path))
    except (cv2.error, SystemError):  # OpenCV raises on some malformed XML instead of returning empty
        cascade = None
    if cascade is None or cascade.empty():
        raise CascadeError(f"{path} is not a valid OpenCV cascade (empty or corrupt XML); "
                        "get lbpcascade_animeface.xml again or point crop.cascade at the upstream URL")
    return cascade


def detect_faces(cascade, rgb: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (x, y, w, h) and neighbour counts, exactly as the upstream example detects them, in one order: on one
    OpenCV thread (threads gather the candidates of each scale in whatever order they finish, and the boxes come out
    in that order), as OpenCV.js in the export's web page runs it."""
    grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    with one_opencv_thread():
        boxes, neighbours = cascade.detectMultiScale2(
            grey, scaleFactor=cfg.scale_factor, minNeighbors=cfg.min_neighbors,
            minSize=(cfg.min_size, cfg.min_size))
    return np.asarray(boxes, dtype=int).reshape(-1, 4), np.asarray(neighbours, dtype=int).reshape(-1)


ONE_THREAD = threading.Lock()  # OpenCV's thread count is the process's: one detection sets it at a time


@contextlib.contextmanager
def one_opencv_thread():
    with ONE_THREAD:
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            yield
        finally:
            cv2.setNumThreads(threads)


def square_crop_box(box, margin: float, width: int, height: int) -> tuple[int, int, int]:
    """(x, y, side) of a square around `box` grown by `margin`, moved inside the image (and shrunk if needed)."""
    x, y, w, h = box
    side = min(int(round(max(w, h) * (1 + 2 * margin))), width, height)
    cx, cy = x + w / 2, y + h / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, side


def face_tiles(cascade, rgb: np.ndarray, alpha: np.ndarray | None, cfg) -> list[dict]:
    """Every face as {tile: size x size x 3 uint8, box, crop, neighbours}. Detection runs on the stored
    colours, as upstream's cv2.imread does; tiles are cut from the picture composited over white."""
    boxes, neighbours = detect_faces(cascade, rgb, cfg)
    rgb = on_white(rgb, alpha)
    height, width = rgb.shape[:2]
    faces = []
    for box, n in zip(boxes, neighbours):
        left, top, side = square_crop_box(box, cfg.margin, width, height)
        tile = cv2.resize(rgb[top:top + side, left:left + side], (cfg.size, cfg.size), interpolation=cv2.INTER_AREA)
        faces.append({"tile": tile, "box": [int(v) for v in box], "crop": [left, top, side], "neighbours": int(n)})
    return faces
