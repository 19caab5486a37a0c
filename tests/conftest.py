"""Fixtures shared by the test modules.

Real data comes through tests/realdata.py (../shared, else pinned upstream files, else a skip);
`tiny_data` is synthetic and available everywhere, and `tiny_runs` are two tiny models trained on it once
per test session, which the sampling, evaluation and explorer tests share without changing them
(`runs_copy` gives a test a copy it may write into).
"""
import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline.pack import pack
from tests import realdata
from tests.helpers import (CHROMIUM, NO_BROWSER, ROOT, export, run_module, synthetic_faces, train_args,
                           upstream_face_counts)


@pytest.fixture(scope="session")
def cascade():
    return realdata.root_for("cascade") / "cascade" / "lbpcascade_animeface.xml"


@pytest.fixture(scope="session")
def illustrations():
    return realdata.root_for("illustrations") / "data" / "illustrations"


@pytest.fixture(scope="session")
def upstream_faces(illustrations, cascade):
    """{illustration: faces the plain upstream example finds in it}, counted once per session."""
    return upstream_face_counts(illustrations, cascade)


@pytest.fixture(scope="session")
def month_dir():
    return realdata.root_for("month_pages") / "getchu" / "month_title"


@pytest.fixture(scope="session")
def faces_sample():
    """A folder whose first 700 tiles (by name) are the real Getchu faces the tests use."""
    return realdata.root_for("faces_sample") / "data" / "faces" / "getchu-2000-2009"


@pytest.fixture(scope="session")
def faces_full():
    return realdata.root_for("faces_full") / "data" / "faces" / "getchu-2000-2009"


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, faces_sample):
    """About 600 unique real faces packed as train/test arrays."""
    root = tmp_path_factory.mktemp("small")
    faces = root / "faces"
    faces.mkdir()
    for path in sorted(faces_sample.glob("*.jpg"))[:700]:
        (faces / path.name).write_bytes(path.read_bytes())
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf/pack/default.yaml"),
                          {"faces_dir": str(faces), "size": 64, "test_fraction": 0.15,
                           "train_file": str(root / "train.npy"), "test_file": str(root / "test.npy")})
    pack(cfg)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """480 synthetic cartoon faces (400 train / 80 test), for tests of mechanics rather than quality."""
    root = tmp_path_factory.mktemp("tiny")
    faces = synthetic_faces(480)
    np.save(root / "train.npy", faces[:400])
    np.save(root / "test.npy", faces[400:])
    return root


@pytest.fixture(scope="session")
def tiny_runs(tiny_data, tmp_path_factory):
    """An outputs/ folder holding two tiny runs on `tiny_data`: obs_std 0.3, then 0.1 (the newest, which has a
sharp decoder: 10 steps of it). Read only."""
    out = tmp_path_factory.mktemp("tiny_runs")
    for obs_std, sharp_steps in ((0.3, 0), (0.1, 10)):
        run_module("pipeline.train", *train_args(tiny_data, out, "train.max_steps=15", f"obs_std={obs_std}",
                                                 sharp_steps=sharp_steps))
    return out


@pytest.fixture
def runs_copy(tiny_runs, tmp_path):
    """A copy of `tiny_runs` that a test may write into (samples beside the checkpoint, caches, metrics)."""
    return shutil.copytree(tiny_runs, tmp_path / "outputs")


@pytest.fixture(scope="session")
def exported(tiny_runs, tmp_path_factory):
    """The obs_std=0.1 tiny run exported once (read only: tests that write into one copy it)."""
    out = tmp_path_factory.mktemp("export") / "faces-0.1"
    assert export(tiny_runs, "+obs_std=0.1", f"out={out}").stdout.strip().splitlines()[-1] == str(out)
    return out


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (Debian's) driven by Playwright, once per session; a skip naming what to install."""
    if CHROMIUM is None:
        pytest.skip(f"no Chromium found: {NO_BROWSER}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(f"playwright is not installed: {NO_BROWSER}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()
