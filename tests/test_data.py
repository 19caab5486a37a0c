"""`make data` end to end against the local Getchu-style site, including a kill and a restart."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.io import read_jsonl
from tests.getchu_site import GetchuSite
from tests.helpers import ROOT, run_module

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site_files(month_dir, illustrations, cascade):
    return month_dir, illustrations, cascade


def data_args(site, data_dir, cascade, delay=0.0):
    return [f"scrape.base_url={site.url}", "scrape.start=2015-05", "scrape.end=2015-05",
            f"scrape.delay={delay}", "scrape.timeout=1", "scrape.backoff=0.05", f"crop.cascade={cascade}",
            f"paths.data_dir={data_dir}", f"paths.output_dir={data_dir}/outputs", "pack.test_fraction=0.2"]


def tiles_of(data_dir):
    return {p.name: np.asarray(Image.open(p)) for p in sorted((data_dir / "faces").glob("*.png"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, site_files):
    month_dir, illustrations, cascade = site_files
    data_dir = tmp_path_factory.mktemp("data")
    with GetchuSite(month_dir, illustrations) as site:
        run_module("pipeline.data", *data_args(site, data_dir, cascade))
        image_requests = site.image_requests()
        run_module("pipeline.data", *data_args(site, data_dir, cascade))
        second_run_requests = site.image_requests() - image_requests
    return data_dir, site, second_run_requests


def test_make_data_turns_the_site_into_64px_face_tiles_and_packed_splits(finished_run, upstream_faces):
    data_dir, site, second_run_requests = finished_run
    tiles = tiles_of(data_dir)
    assert len(tiles) >= sum(upstream_faces[source] for source in site.expected_files.values()) >= 80
    assert all(t.shape == (64, 64, 3) for t in tiles.values())
    manifest = read_jsonl(data_dir / "faces" / "manifest.jsonl")
    assert all(row["url"].startswith(site.url + "/brandnew/") for row in manifest)
    train, test = np.load(data_dir / "train.npy"), np.load(data_dir / "test.npy")
    assert train.shape[1:] == (3, 64, 64) and len(train) + len(test) == len({t.tobytes() for t in tiles.values()})
    assert second_run_requests == 0


def wait_for_rows(path, count, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(read_jsonl(path)) >= count:
            return True
        time.sleep(0.05)
    return False


def test_killed_runs_resume_to_the_same_tiles_without_partial_files(finished_run, tmp_path, site_files):
    month_dir, illustrations, cascade = site_files
    reference, _, _ = finished_run
    data_dir = tmp_path / "data"
    with GetchuSite(month_dir, illustrations) as site:
        args = [sys.executable, "-m", "pipeline.data", *data_args(site, data_dir, cascade, delay=0.02)]
        for log_file, rows in ((data_dir / "raw" / "index.jsonl", 40), (data_dir / "faces" / "sources.jsonl", 30)):
            proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            killed_mid_run = wait_for_rows(log_file, rows, proc)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            assert killed_mid_run, f"the run ended before {log_file.name} had {rows} rows"
        run_module("pipeline.data", *data_args(site, data_dir, cascade))
    assert not [p for p in data_dir.rglob("*") if p.name.endswith(".part")]
    ours, theirs = tiles_of(data_dir), tiles_of(reference)
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert np.array_equal(np.load(data_dir / "train.npy"), np.load(reference / "train.npy"))
