"""`python -m pipeline.explore`: its API on two tiny trained runs, its bad inputs, and the page in a real
headless Chromium (Debian's package, driven by Playwright; marked slow, as is a second server process)."""
import base64
import io
import json
import shutil
import socket

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from pipeline.explore import LoadedRun, BadRequest
from pipeline.faces import face_tiles, load_cascade
from pipeline.hair import PALETTE
from pipeline.images import load_image
from tests.helpers import post, run_module, start_explorer as start


@pytest.fixture(scope="module")
def runs(tiny_runs, tmp_path_factory):
    """The session's two tiny runs (obs_std 0.3, then 0.1: the newest), copied: the explorer stores
    directions.pt beside each checkpoint."""
    return shutil.copytree(tiny_runs, tmp_path_factory.mktemp("explore") / "outputs")


@pytest.fixture(scope="module")
def server(runs):
    proc, url, _ = start(runs, "explore.max_upload_mb=0.5")
    yield url
    proc.terminate()
    proc.wait(30)


def pixels(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload(url, data: bytes, name: str):
    return requests.post(f"{url}api/upload", params={"name": name, "run": "0"}, data=data, timeout=120,
                         headers={"Content-Type": "application/octet-stream"})


def test_opens_on_the_newest_run_and_lists_one_run_per_obs_std(server, runs):
    listed = requests.get(server + "api/runs", timeout=60).json()
    assert [r["obs_std"] for r in listed["runs"]] == [0.1, 0.3]
    first = listed["runs"][0]
    assert first["prior"] == "gmm" and first["nearest"] and first["directions_from"].startswith("encoder means")
    assert listed["directions"] == 8 and listed["grid"] == 64
    page = requests.get(server, timeout=60).text
    assert "<script>" in page and "http://" not in page and "https://" not in page  # nothing fetched elsewhere


def test_samples_are_seeded_and_follow_prior_and_temperature(server):
    a, b = post(server, "sample", seed=3).json(), post(server, "sample", seed=3).json()
    c = post(server, "sample", seed=4).json()
    assert len(a["images"]) == 64 and a["prior"] == "gmm" and a["codes"] == b["codes"] != c["codes"]
    assert np.array_equal(pixels(a["images"][0]), pixels(b["images"][0]))
    assert pixels(a["images"][0]).shape == (64, 64, 3)
    normal = post(server, "sample", seed=3, prior="normal", n=256).json()
    assert normal["prior"] == "normal" and abs(np.std(normal["codes"]) - 1) < 0.05
    cold = post(server, "sample", seed=3, prior="normal", temperature=0.5, n=256).json()
    assert abs(np.std(cold["codes"]) - 0.5) < 0.03
    elbo = post(server, "sample", seed=3, decoder="elbo").json()
    noisy = post(server, "sample", seed=3, noise=True, decoder="elbo").json()
    assert noisy["codes"] == a["codes"] and not np.array_equal(pixels(noisy["images"][0]), pixels(elbo["images"][0]))


def test_the_decoder_toggle_and_the_same_code_through_both(server):
    assert post(server, "sample", run="1", n=1).ok  # the obs_std 0.3 run, loaded on first use
    listed = requests.get(server + "api/runs", timeout=60).json()["runs"]
    assert [r["decoders"] for r in listed] == [["sharp", "elbo"], ["elbo"]]  # obs_std 0.1 has a sharp decoder
    z = post(server, "sample", seed=2, n=1).json()["codes"][0]
    default, sharp, elbo = (post(server, "steer", z=z, offsets=[], **extra).json()["images"][0]
                            for extra in ({}, {"decoder": "sharp"}, {"decoder": "elbo"}))
    assert default == sharp and not np.array_equal(pixels(sharp), pixels(elbo))
    both = post(server, "decoders", z=z).json()
    assert both == {"sharp": [sharp], "elbo": [elbo]}
    assert post(server, "decoders", z=z, run="1").json().keys() == {"elbo"}
    assert len(post(server, "interpolate", a=z, b=z, decoder="elbo").json()["images"]) == 10
    strip = requests.get(server + "api/directions", params={"decoder": "elbo"}, timeout=60).json()
    assert strip["rows"][0]["images"] != requests.get(server + "api/directions", timeout=60).json()["rows"][0]["images"]


def test_steering_moves_along_stored_principal_directions(server, runs):
    z = post(server, "sample", seed=1, n=1).json()["codes"][0]
    still = post(server, "steer", z=z, offsets=[0] * 8).json()
    assert np.allclose(still["code"], z, atol=1e-6)
    moved = post(server, "steer", z=z, offsets=[2, 0, -1]).json()
    assert not np.array_equal(pixels(moved["images"][0]), pixels(still["images"][0]))
    stored = torch.load(next(runs.rglob("obs_std-0.1/*/directions.pt")), weights_only=True)
    expected = torch.tensor(z) + 2 * stored["std"][0] * stored["directions"][0] - stored["std"][2] * stored["directions"][2]
    assert np.allclose(moved["code"], expected.numpy(), atol=1e-4)
    strip = requests.get(server + "api/directions", timeout=60).json()
    assert len(strip["rows"]) == 8 and all(len(r["images"]) == 7 for r in strip["rows"])
    assert strip["rows"][0]["variance"] >= strip["rows"][1]["variance"]


def test_interpolation_nearest_faces_and_obs_std_side_by_side(server):
    a, b = post(server, "sample", seed=5, n=2).json()["codes"]
    walk = post(server, "interpolate", a=a, b=b).json()["images"]
    ends = post(server, "steer", z=a, offsets=[]).json()["images"][0], post(server, "steer", z=b, offsets=[]).json()["images"][0]
    assert len(walk) == 10 and np.array_equal(pixels(walk[0]), pixels(ends[0]))
    assert np.array_equal(pixels(walk[-1]), pixels(ends[1]))
    near = post(server, "nearest", z=a).json()
    assert len(near["images"]) == 6 and near["distances"] == sorted(near["distances"])
    rows = post(server, "compare", z=a).json()["rows"]
    assert [r["obs_std"] for r in rows] == [0.1, 0.3] and all(len(r["images"]) == 1 for r in rows)


def test_bad_requests_get_a_message_not_a_traceback(server):
    checks = [(post(server, "steer", z=[1, 2], offsets=[]), 400, "32 finite numbers"),
              (post(server, "steer", z=[0] * 32, offsets=[1e308]), 400, "offsets must be a list of numbers from"),
              (post(server, "steer", z=[0] * 32, offsets=["up"]), 400, "offsets must be a list of numbers from"),
              (post(server, "sample", run="9"), 404, "run='9' is not one of"),
              (post(server, "sample", decoder="blurry"), 400, "decoder='blurry': use sharp or elbo"),
              (post(server, "sample", run="1", decoder="sharp"), 400, "this run has no sharp decoder"),
              (post(server, "sample", noise=True), 400, "switch the decoder to ELBO"),
              (post(server, "sample", temperature="hot"), 400, "temperature must be a number"),
              (post(server, "sample", n=100000), 400, "out of range"),
              (requests.post(server + "api/sample", data="{", timeout=60), 400, "not JSON"),
              (upload(server, b"just text", "notes.txt"), 400, "notes.txt is not a picture"),
              (upload(server, b"", "empty.png"), 400, "empty.png is empty"),
              (upload(server, b"x" * (2 ** 20), "big.png"), 413, "over the upload limit of 0.5 MB")]
    for response, status, text in checks:
        assert response.status_code == status and text in response.json()["error"], response.text
        assert "Traceback" not in response.text


def test_decompression_bombs_are_refused_by_size(server):
    bomb = png_bytes(Image.new("1", (20000, 20000)))  # 400 Mpx in a few kB, over crop.max_pixels
    response = upload(server, bomb, "bomb.png")
    assert response.status_code == 400 and "bomb.png" in response.json()["error"]
    assert "max_pixels" in response.json()["error"]


def test_uploads_find_faces_with_the_crop_detector(server, cascade, illustrations):
    with_face = first_illustration_with_a_face(illustrations, cascade)
    found = upload(server, with_face.read_bytes(), with_face.name).json()
    assert found["faces"] and len(found["recons"]) == len(found["faces"]) == len(found["codes"])
    assert pixels(found["recons"][0]).shape == (64, 64, 3)
    blank = upload(server, png_bytes(Image.new("RGB", (640, 400), "white")), "blank.png")
    assert blank.status_code == 400 and "no face found in blank.png" in blank.json()["error"]
    tile = upload(server, png_bytes(Image.new("RGB", (64, 64), "pink")), "tile.png").json()
    assert len(tile["faces"]) == 1 and "taken as one face tile" in tile["note"]


def first_illustration_with_a_face(illustrations, cascade):
    detector = load_cascade(cascade)
    settings = type("Settings", (), {"scale_factor": 1.1, "min_neighbors": 5, "min_size": 24, "margin": 0.0,
                                     "size": 64})
    for path in sorted(illustrations.rglob("*.jpg")):
        rgb, alpha = load_image(path, 64_000_000)
        if max(rgb.shape) < 1200 and face_tiles(detector, rgb, alpha, settings):
            return path
    pytest.fail(f"no illustration under {illustrations} has a face the cascade finds")


def test_hair_colours_draw_the_grid_and_every_slider_value_is_checked(server):
    listed = requests.get(server + "api/runs", timeout=60).json()["runs"][0]
    offered, missing = listed["hair"], listed["hair_not_offered"]
    assert offered and set(offered) | set(missing) == set(PALETTE) and listed["hair_note"] == ""
    assert all(why.endswith("(at least 20 are needed)") for why in missing.values())
    assert [s["name"] for s in listed["sliders"] if s["kind"] == "colour"] == offered
    colour = offered[0]
    drawn = post(server, "sample", seed=1, hair=colour, n=8).json()
    assert drawn["prior"] == f"hair={colour}" and drawn["codes"] != post(server, "sample", seed=1, n=8).json()["codes"]
    refused = post(server, "sample", hair="teal")
    assert refused.status_code == 400 and f"offered: {', '.join(offered)}" in refused.json()["error"]
    z = drawn["codes"][0]
    towards = post(server, "steer", z=z, offsets=[], named={colour: 1.0}).json()
    assert towards["code"] != post(server, "steer", z=z, offsets=[]).json()["code"]
    for body, message in (({"named": {colour: 1e308}}, "use a number from -1000 to 1000"),
                          ({"offsets": [1e308]}, "numbers from -1000 to 1000"),
                          ({"named": {colour: "far"}}, "use a number from -1000 to 1000"),
                          ({"named": {"glasses": 1}}, "steer.glasses: no such slider")):
        response = post(server, "steer", z=z, **{"offsets": [], **body})
        assert response.status_code == 400 and message in response.json()["error"], response.text


def test_sliders_made_from_marked_faces_are_saved_in_the_run_folder(server, runs):
    codes = post(server, "sample", seed=5, n=8).json()["codes"]
    for name, has, message in (("smile", codes[:3], "at least 4 faces that have it and 4 that lack it; marked: 3 and 4"),
                               ("", codes[:4], "one plain word"), ("long hair", codes[:4], "one plain word"),
                               (PALETTE[0], codes[:4], "exists already")):
        response = post(server, "sliders", name=name, has=has, lacks=codes[4:])
        assert response.status_code == 400 and message in response.json()["error"], response.text
    made = post(server, "sliders", name="smile", has=codes[:4], lacks=codes[4:]).json()["sliders"]
    assert made[-1] == {"name": "smile", "kind": "custom", "made_from": "4 faces that have it, 4 that lack it"}
    assert post(server, "sliders", name="smile", has=codes[:4], lacks=codes[4:]).status_code == 400  # exists now
    saved = json.loads((next(runs.glob("train/obs_std-0.1/*")) / "sliders.json").read_text())["sliders"]
    assert [s["name"] for s in saved] == ["smile"] and len(saved[0]["direction"]) == len(codes[0])
    assert requests.get(server + "api/runs", timeout=60).json()["runs"][0]["sliders"][-1]["name"] == "smile"
    moved = post(server, "steer", z=codes[0], offsets=[], named={"smile": 1}).json()["code"]
    expected = np.array(codes[0]) + np.mean(codes[:4], 0) - np.mean(codes[4:], 0)
    assert np.allclose(moved, expected, atol=1e-4)


def test_nearest_faces_say_when_the_training_data_is_gone(runs, tmp_path):
    settings = type("Settings", (), {"directions": 4, "strip": 3, "nearest": 2, "interp_steps": 2})
    loaded = LoadedRun(next(runs.rglob("ckpt.pt")), torch.device("cpu"), settings, data_dir=tmp_path / "no-data")
    loaded.run.config["train"]["train_file"] = "/nonexistent/train.npy"
    assert not loaded.describe()["nearest"]
    with pytest.raises(BadRequest, match="not available, the training split /nonexistent/train.npy"):
        loaded.nearest(torch.zeros(1, loaded.latent_dim))


def test_no_run_is_the_same_message_as_sampling_before_any_server(tmp_path):
    for args in ([], ["+obs_std=0.1"]):
        explored = run_module("pipeline.explore", f"paths.output_dir={tmp_path}", "explore.port=0", *args, check=False)
        sampled = run_module("pipeline.sample", f"paths.output_dir={tmp_path}", *args, check=False)
        assert explored.returncode == sampled.returncode == 2
        assert explored.stderr.strip().splitlines()[-1] == sampled.stderr.strip().splitlines()[-1]
        assert "no trained run under" in explored.stderr and "http://" not in explored.stdout


def test_a_busy_port_is_one_clear_line(runs):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_module("pipeline.explore", f"paths.output_dir={runs}", f"explore.port={port}", check=False)
    assert proc.returncode == 2 and f"cannot serve on 127.0.0.1:{port}" in proc.stderr


@pytest.mark.slow
def test_another_host_warns_that_the_page_is_shared(runs):
    proc, url, log = start(runs, "explore.host=0.0.0.0")
    try:
        assert requests.get(url + "api/runs", timeout=60).ok
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert "explore.host=0.0.0.0: the explorer is reachable from other machines" in log


# --- in a real browser ---------------------------------------------------------------------------------------

@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server)
    page.wait_for_selector("body[data-ready='1']", timeout=120_000)
    yield page
    page.close()
    assert not errors, f"the page raised: {errors}"


def image_src(page, selector):
    return page.eval_on_selector(selector, "img => img.src")


@pytest.mark.slow
def test_page_resamples_steers_interpolates_and_compares(page, tmp_path):
    assert page.locator("#grid img").count() == 64
    before = image_src(page, "#grid figure:first-child img")
    page.click("#resample")
    page.wait_for_function(f"document.querySelector('#grid img').src !== {before!r}")
    page.click("#grid figure:nth-child(3) img")
    big = image_src(page, "#big-face")
    page.eval_on_selector("#sliders input", "s => { s.value = 2.5; s.dispatchEvent(new Event('input')); }")
    page.wait_for_function(f"document.querySelector('#big-face').src !== {big!r}")
    page.click("#set-a")
    page.eval_on_selector("#sliders input", "s => { s.value = -2.5; s.dispatchEvent(new Event('input')); }")
    page.wait_for_timeout(500)
    page.click("#set-b")
    page.wait_for_selector("#interp img")
    page.click("#nearest-button")
    page.wait_for_selector("#nearest img")
    page.click("#compare-button")
    page.wait_for_selector("#compare figure")
    page.click("#decoders-button")
    page.wait_for_selector("#decoders figure")
    assert page.locator("#decoders figcaption").all_inner_texts() == ["sharp (adversarial)", "ELBO (exact likelihood)"]
    sharp_grid = image_src(page, "#grid figure:first-child img")
    page.select_option("#decoder", "elbo")
    page.wait_for_function(f"document.querySelector('#grid img').src !== {sharp_grid!r}")
    assert "decoder: elbo" in page.locator("#note").inner_text()
    assert page.locator("#interp img").count() == 10 and page.locator("#nearest img").count() == 7
    assert page.locator("#compare figure").count() == 2 and page.locator("#strip .strip-row").count() == 8
    assert page.get_attribute("#big a.dl", "href").startswith("data:image/png;base64,")
    assert page.locator("#message").inner_text() == ""
    page.screenshot(path=str(tmp_path / "explore.png"), full_page=True)


@pytest.mark.slow
def test_page_encodes_an_uploaded_picture_and_shows_bad_uploads(page, cascade, illustrations, tmp_path):
    with_face = first_illustration_with_a_face(illustrations, cascade)
    page.set_input_files("#upload", str(with_face))
    page.wait_for_selector(".upload-face")
    assert page.locator(".upload-face").first.locator("img").count() == 2  # the face and its reconstruction
    page.locator(".upload-face button").first.click()
    assert image_src(page, "#big-face") == page.locator(".upload-face img").nth(1).get_attribute("src")
    page.screenshot(path=str(tmp_path / "explore_upload.png"), full_page=True)
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    page.set_input_files("#upload", str(text))
    page.wait_for_function("document.querySelector('#message').innerText.includes('notes.txt is not a picture')")


@pytest.mark.slow
def test_without_a_cascade_the_page_says_uploads_are_off_and_the_api_refuses_them(browser, runs, tmp_path):
    """A machine without network whose data/cascade/ is empty: said when the page opens, not at the first upload."""
    proc, url, log = start(runs, f"crop.cascade_cache_dir={tmp_path}", cascade="/nowhere/lbpcascade_animeface.xml")
    try:
        off = requests.get(url + "api/runs", timeout=60).json()["uploads_off"]
        assert off.startswith("Uploads are off: crop.cascade=/nowhere/lbpcascade_animeface.xml does not exist")
        refused = upload(url, png_bytes(Image.new("RGB", (64, 64), "pink")), "tile.png")
        assert refused.status_code == 503 and refused.json()["error"] == off
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']", timeout=120_000)
        assert page.is_disabled("#upload") and page.locator("#uploads-off").inner_text() == off
        page.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert "Uploads are off" in log


@pytest.mark.slow
def test_page_draws_a_hair_colour_and_makes_a_slider_from_marked_faces(page):
    chip = page.locator("#chips button:not([disabled])").nth(1)  # the first colour after "any"
    colour = chip.get_attribute("data-hair")
    before = image_src(page, "#grid figure:first-child img")
    chip.click()
    page.wait_for_function(f"document.querySelector('#grid img').src !== {before!r}")
    assert f"prior: hair={colour}" in page.locator("#note").inner_text()
    assert page.locator("#chips button.on").inner_text() == colour
    for i, mark in enumerate(["#mark-has"] * 4 + ["#mark-lacks"] * 4):
        page.click(f"#grid figure:nth-child({i + 1}) img")
        page.click(mark)
    assert page.locator("#has-count").inner_text() == "4" and page.locator("#lacks-count").inner_text() == "4"
    page.fill("#slider-name", "two words")
    page.click("#make-slider")
    page.wait_for_function("document.querySelector('#message').innerText.includes('one plain word')")
    page.fill("#slider-name", "pagemade")
    page.click("#make-slider")
    page.wait_for_selector("#named-sliders input[data-slider='pagemade']")
    assert page.locator(f"#named-sliders input[data-slider='{colour}']").count() == 1  # "towards <colour>"
    big = image_src(page, "#big-face")
    page.eval_on_selector("#named-sliders input[data-slider='pagemade']",
                          "s => { s.value = 1.5; s.dispatchEvent(new Event('input')); }")
    page.wait_for_function(f"document.querySelector('#big-face').src !== {big!r}")
    assert page.locator("#message").inner_text() == ""
