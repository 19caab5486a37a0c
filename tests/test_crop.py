import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline.crop import CropError, crop
from pipeline.faces import CascadeError, square_crop_box
from pipeline.images import find_images
from pipeline.io import read_jsonl
from tests.getchu_site import GetchuSite, serve
from tests.helpers import ROOT

CONF = OmegaConf.load(ROOT / "conf/crop/default.yaml")


@pytest.fixture
def crop_cfg(tmp_path, cascade):
    def make(input_dir, **overrides):
        return OmegaConf.merge(CONF, {"input_dir": str(input_dir), "output_dir": str(tmp_path / "faces"),
                                      "cascade": str(cascade), "cascade_cache_dir": str(tmp_path / "cascade")},
                               overrides)
    return make


@pytest.mark.slow
def test_real_illustrations_give_at_least_upstreams_faces_as_64px_rgb_tiles(tmp_path, crop_cfg, illustrations,
                                                                            upstream_faces):
    totals = crop(crop_cfg(illustrations))
    tiles = sorted((tmp_path / "faces").glob("*.png"))
    assert totals["faces"] == len(tiles) >= sum(upstream_faces.values()) >= 80
    for tile in tiles:
        with Image.open(tile) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
    manifest = read_jsonl(tmp_path / "faces" / "manifest.jsonl")
    assert sorted(r["tile"] for r in manifest) == [t.name for t in tiles]
    assert all(len(r["box"]) == 4 and r["neighbours"] >= 5 and r["source"] for r in manifest)

    again = crop(crop_cfg(illustrations))  # rerun: every source already done
    assert again["images"] == 0


def test_odd_and_broken_files_are_converted_or_skipped(tmp_path, crop_cfg, illustrations):
    src = tmp_path / "in"
    src.mkdir()
    face = illustrations / "SICP" / "Hanamaru_Kunikida_Holding_SICP.jpg"
    rgb = Image.open(face).convert("RGB")
    rgb.convert("L").save(src / "grey.png")
    rgb.convert("P", palette=Image.ADAPTIVE).save(src / "palette.gif")
    rgb.convert("RGBA").save(src / "rgba.webp")
    data = face.read_bytes()
    (src / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (src / "garbage.png").write_bytes(b"definitely not a png")
    Image.new("L", (3000, 3000)).save(src / "bomb.png")
    totals = crop(crop_cfg(src, max_pixels=5_000_000))
    rows = {r["source"]: r for r in read_jsonl(tmp_path / "faces" / "sources.jsonl")}
    assert rows["garbage.png"]["status"] == rows["bomb.png"]["status"] == "skipped"
    assert "max_pixels" in rows["bomb.png"]["reason"]
    assert rows["truncated.jpg"]["status"] == "skipped"
    for name in ("grey.png", "palette.gif", "rgba.webp"):
        assert rows[name]["status"] == "ok" and rows[name]["faces"] >= 1, rows[name]
    assert totals["skipped"] == 3


def test_transparent_pixels_become_white_in_tiles(tmp_path, crop_cfg, illustrations):
    src = tmp_path / "in"
    src.mkdir()
    face = Image.open(sorted(illustrations.rglob("*.jpg"))[0]).convert("RGBA")
    arr = np.asarray(face).copy()
    arr[:, :, 3] = 0
    arr[:, :, :3] = 0
    Image.fromarray(arr).save(src / "invisible.png")
    crop(crop_cfg(src))
    assert not list((tmp_path / "faces").glob("*.png"))  # all white: nothing to find, nothing garbled


def test_square_crop_box_stays_inside_the_image():
    assert square_crop_box((10, 10, 20, 20), 0.0, 100, 100) == (10, 10, 20)
    assert square_crop_box((0, 0, 20, 20), 0.5, 100, 100) == (0, 0, 40)
    assert square_crop_box((80, 90, 20, 10), 0.25, 100, 100) == (70, 70, 30)
    assert square_crop_box((0, 0, 50, 50), 1.0, 60, 40) == (5, 0, 40)  # centred, shrunk to fit


def test_missing_and_corrupt_cascades_are_clear_errors(tmp_path):
    def cfg(input_dir, cascade):
        return OmegaConf.merge(CONF, {"input_dir": str(input_dir), "output_dir": str(tmp_path / "faces"),
                                      "cascade": str(cascade), "cascade_cache_dir": str(tmp_path / "cache")})

    images = tmp_path / "in"
    images.mkdir()
    Image.new("RGB", (64, 64)).save(images / "a.png")
    with pytest.raises(CascadeError, match="does not exist"):
        crop(cfg(images, tmp_path / "nope.xml"))
    bad = tmp_path / "bad.xml"
    bad.write_text("<opencv_storage></opencv_storage>")
    with pytest.raises(CascadeError, match="not a valid OpenCV cascade"):
        crop(cfg(images, bad))
    with pytest.raises(CropError, match="is not a folder"):
        crop(cfg(tmp_path / "missing", bad))


def test_cascade_url_is_downloaded_once_and_checked(tmp_path, crop_cfg, cascade, illustrations):
    hits = []

    def handle(handler):
        hits.append(handler.path)
        GetchuSite.send(handler, 200, cascade.read_bytes(), "application/xml")

    server = serve(handle)
    url = f"http://127.0.0.1:{server.server_address[1]}/lbpcascade_animeface.xml"
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(sorted(illustrations.rglob("*.jpg"))[0], src / "a.jpg")
    cached = tmp_path / "cascade" / "lbpcascade_animeface.xml"
    try:
        with pytest.raises(CascadeError, match="sha256"):
            crop(crop_cfg(src, cascade=url, cascade_sha256="0" * 64))
        assert not cached.exists()
        crop(crop_cfg(src, cascade=url))
        crop(crop_cfg(src, cascade=url))
        assert cached.read_bytes() == cascade.read_bytes() and len(hits) == 2
    finally:
        server.shutdown()
        server.server_close()


def test_a_file_that_vanishes_mid_run_is_skipped(tmp_path, crop_cfg, illustrations, monkeypatch):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for source in sorted(p for p in illustrations.rglob("*.jpg"))[:3]:
        shutil.copy(source, pictures / source.name)
    listed = find_images(pictures)
    (pictures / "gone.png").write_bytes(b"")  # listed, then deleted before it is read
    monkeypatch.setattr("pipeline.crop.find_images", lambda folder: [*listed, folder / "gone.png"])
    (pictures / "gone.png").unlink()
    totals = crop(crop_cfg(pictures))
    rows = {r["source"]: r for r in read_jsonl(tmp_path / "faces" / "sources.jsonl")}
    assert totals["images"] == 4 and totals["skipped"] == 1
    assert rows["gone.png"]["status"] == "skipped" and "FileNotFoundError" in rows["gone.png"]["reason"]
    assert all(rows[p.name]["status"] == "ok" for p in listed)


def test_partial_tiles_of_a_killed_run_are_removed_on_the_next(tmp_path, crop_cfg, illustrations):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(sorted(illustrations.rglob("*.jpg"))[0], src / "a.jpg")
    stale = tmp_path / "faces" / ".a_123456_0.png.k2j4h1.part"  # what atomic_write leaves after a SIGKILL
    stale.parent.mkdir()
    stale.write_bytes(b"half a png")
    crop(crop_cfg(src))
    assert not stale.exists() and not list((tmp_path / "faces").rglob("*.part"))
