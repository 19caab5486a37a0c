"""Faults of a user's machine, made for real (tests/faults.py: a small tmpfs as root, else a file-size limit): a
full disk, a read-only folder, an odd out=. Every stage ends in one line naming the path and what the system said,
exit status 2, nothing already written damaged, no temp file left, and the command that goes on works."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests
from PIL import Image

from pipeline import load
from pipeline.io import read_jsonl
from pipeline.runs import load_checkpoint
from tests.faults import MODE, SmallDisk, one_error_line
from tests.helpers import CASCADE, ROOT, post, run_module, start_explorer, synthetic_faces, train_args

MiB = 1 << 20


def no_partial_files(folder) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith((".part", ".old"))]


def face_files(folder, n: int, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, face in enumerate(synthetic_faces(n, seed)):
        Image.fromarray(face.transpose(1, 2, 0)).save(folder / f"{seed}_{i:04d}.png")
    return folder


# ---------------------------------------------------------------- out= before any work

def test_out_is_checked_before_any_work(tiny_runs, tmp_path):
    (tmp_path / "a-file").write_text("mine")
    for out, message in (
            (tmp_path / "grid.xyz", "out={}: .xyz is not a picture format this can write; end it in .png (lossless)"),
            (tmp_path / "grid", "out={}: no extension is not a picture format"),
            (tmp_path / "a-file" / "grid.png", f"out={{}}: {tmp_path / 'a-file'} is a file, so no folder can be made"),
            (tmp_path / ("x" * 300 + ".png"), "is longer than the file system allows (255 bytes)")):
        proc = run_module("pipeline.sample", f"paths.output_dir={tiny_runs}", "+obs_std=0.1", f"out={out}",
                          check=False)
        assert proc.returncode == 2 and message.format(out) in one_error_line(proc.stderr), proc.stderr
        assert "prior:" not in proc.stderr + proc.stdout  # refused before a code was drawn
        assert out.name != "grid.xyz" or " .webp" in proc.stderr  # the formats it can write are listed
    folder = tmp_path / "grids"  # a folder (existing, or named with a trailing /) gets the default name in it
    folder.mkdir()
    assert run_module("pipeline.sample", f"paths.output_dir={tiny_runs}", "+obs_std=0.1", "n=4", f"out={folder}")
    assert [p.name for p in folder.iterdir()] == ["samples_gmm_means_seed0_sharp.png"]
    webp = run_module("pipeline.sample", f"paths.output_dir={tiny_runs}", "+obs_std=0.1", "n=4",
                      f"out={tmp_path}/new/grid.webp").stdout.strip().splitlines()[-1]
    with Image.open(webp) as picture:
        assert picture.format == "WEBP"
    for out, message in ((tmp_path / "a-file", f"out={tmp_path / 'a-file'} is a file: name a folder"),
                         (tmp_path / "a-file" / "export", f"{tmp_path / 'a-file'} is a file, so no folder can be made")):
        proc = run_module("pipeline.export", f"paths.output_dir={tiny_runs}", "+obs_std=0.1", f"out={out}",
                          f"crop.cascade={CASCADE}", "web.enabled=false", check=False)
        assert proc.returncode == 2 and message in one_error_line(proc.stderr)
    assert (tmp_path / "a-file").read_text() == "mine"


# ---------------------------------------------------------------- data stages

def test_a_pack_on_a_full_disk_keeps_the_earlier_splits_and_a_rerun_completes(tmp_path):
    small, large = face_files(tmp_path / "small", 40), face_files(tmp_path / "large", 200, seed=1)
    logs = f"paths.output_dir={tmp_path / 'outputs'}"
    with SmallDisk(tmp_path / "disk", size=int(1.5 * MiB)) as disk:
        disk.file_limit = MiB // 2
        data = f"paths.data_dir={disk.folder}"
        assert disk.run("pipeline.pack", data, logs, f"pack.faces_dir={small}").returncode == 0
        before = {p: p.read_bytes() for p in disk.files()}
        assert sorted(p.name for p in before) == ["splits.json", "test.npy", "train.npy"]
        proc = disk.run("pipeline.pack", data, logs, f"pack.faces_dir={large}")
        line = one_error_line(proc.stderr)
        assert proc.returncode == 2 and line.startswith(f"error: cannot write {disk.folder}/t")
        assert ("No space left on device" if MODE == "tmpfs" else "File too large") in line
        assert "train.npy, test.npy and splits.json are as they were" in line and "run the same command" in line
        assert {p: p.read_bytes() for p in disk.files()} == before and no_partial_files(disk.folder)
        disk.make_room(8 * MiB)
        assert disk.run("pipeline.pack", data, logs, f"pack.faces_dir={large}").returncode == 0
        assert json.loads((disk.folder / "splits.json").read_text())["unique"] == 200


@pytest.mark.slow
def test_a_crop_that_runs_out_of_space_gives_every_face_on_a_rerun(tmp_path, cascade, illustrations):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for path in sorted(p for p in illustrations.rglob("*") if p.suffix in (".jpg", ".png"))[:16]:
        (pictures / path.name).write_bytes(path.read_bytes())
    common = [f"paths.output_dir={tmp_path / 'outputs'}", f"crop.input_dir={pictures}", f"crop.cascade={cascade}",
              "crop.workers=1"]
    assert run_module("pipeline.crop", *common, f"crop.output_dir={tmp_path / 'expected'}").returncode == 0
    expected = sorted(r["tile"] for r in read_jsonl(tmp_path / "expected" / "manifest.jsonl"))
    assert len(expected) >= 5
    with SmallDisk(tmp_path / "disk", size=48 << 10) as disk:
        disk.file_limit = 8 << 10  # some tiles are larger
        proc = disk.run("pipeline.crop", *common, f"crop.output_dir={disk.folder}")
        line = one_error_line(proc.stderr)
        assert proc.returncode == 2 and f"cannot write {disk.folder}/" in line
        assert "every face tile and manifest row written before is kept" in line and no_partial_files(disk.folder)
        kept = read_jsonl(disk.folder / "manifest.jsonl")
        assert len(kept) < len(expected) and all((disk.folder / r["tile"]).is_file() for r in kept)
        disk.make_room(8 * MiB)
        assert disk.run("pipeline.crop", *common, f"crop.output_dir={disk.folder}").returncode == 0
        tiles = sorted(r["tile"] for r in read_jsonl(disk.folder / "manifest.jsonl"))
        assert tiles == expected and sorted(p.name for p in disk.folder.glob("*.png")) == expected
        for name in expected:
            assert (disk.folder / name).read_bytes() == (tmp_path / "expected" / name).read_bytes()


@pytest.mark.slow
def test_a_scrape_that_runs_out_of_space_fetches_the_rest_on_a_rerun(tmp_path, month_dir, illustrations):
    from tests.getchu_site import GetchuSite
    with GetchuSite(month_dir, illustrations, faults=False) as site, \
            SmallDisk(tmp_path / "disk", size=1 * MiB) as disk:
        disk.file_limit = 64 << 10
        common = [f"paths.output_dir={tmp_path / 'outputs'}", f"scrape.base_url={site.url}", "scrape.start=2015-05",
                  "scrape.end=2015-05", "scrape.delay=0", "scrape.timeout=1", "scrape.backoff=0.05",
                  f"scrape.raw_dir={disk.folder}"]
        proc = disk.run("pipeline.scrape", *common)
        line = one_error_line(proc.stderr)
        assert proc.returncode == 2 and f"cannot write {disk.folder}/" in line
        assert "every page and image saved before is kept" in line and no_partial_files(disk.folder)
        disk.make_room(256 * MiB)
        assert disk.run("pipeline.scrape", *common).returncode == 0
        rows = {r["url"].removeprefix(site.url): r for r in read_jsonl(disk.folder / "index.jsonl")}
        for path, source in site.expected_files.items():
            assert (disk.folder / rows[path]["file"]).read_bytes() == source.read_bytes()


# ---------------------------------------------------------------- training

def start_training(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def first_checkpoint(folder, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(folder.rglob("ckpt.pt"))
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint before the run ended: {proc.communicate()[1][-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["by itself", "by SIGTERM"])
def test_a_training_whose_disk_fills_up_says_what_was_lost_and_resumes(tiny_data, tmp_path, stop):
    """The disk fills up after the first checkpoint; the run stops at its next write (a metrics row, a grid, the
    checkpoint), or on SIGTERM, whose checkpoint then cannot be written."""
    every = ["train.ckpt_every=5"] if stop == "by itself" else ["train.ckpt_every=10", "train.log_every=100000"]
    with SmallDisk(tmp_path / "disk", size=64 * MiB) as disk:
        args = train_args(tiny_data, disk.folder, "train.max_steps=40", "train.num_threads=1", *every)
        proc = start_training(args)
        ckpt = first_checkpoint(disk.folder, proc)
        disk.fill(proc.pid)
        if stop == "by SIGTERM":
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
        line = one_error_line(err)
        saved = load_checkpoint(ckpt)["step"]  # the last checkpoint loads
        assert proc.returncode == 2 and f"its last checkpoint {ckpt} (step {saved}) is intact" in line, line
        stopped = int(re.search(r"the run stopped at step (\d+)", line).group(1))
        lost = stopped - saved
        assert f"and {lost} step{'s' if lost > 1 else ''} since were lost" in line and lost > 0
        assert (" (signal 15)" in line) == (stop == "by SIGTERM")
        assert line.endswith(f"once that is fixed, resume with: python -m pipeline.train resume={ckpt.parent}")
        assert no_partial_files(disk.folder)
        disk.make_room()
        run_module("pipeline.train", *args, f"resume={ckpt.parent}")
        assert load_checkpoint(ckpt)["step"] == 40 and (ckpt.parent / "prior.pt").is_file()
        steps = [int(line.split(",")[0]) for line in (ckpt.parent / "metrics.csv").read_text().splitlines()[1:]]
        assert steps == sorted(set(steps)) and steps[-1] == 40


# ---------------------------------------------------------------- sample, export, explore

def test_a_read_only_run_folder_is_one_line_and_another_out_works(tiny_runs, tmp_path):
    if MODE != "tmpfs" and os.geteuid() == 0:
        pytest.skip("a folder's permissions do not bind root, and no read-only tmpfs is mounted here")
    with SmallDisk(tmp_path / "disk", size=64 * MiB) as disk:
        runs = disk.folder / "outputs"
        subprocess.run(["cp", "-r", str(tiny_runs), str(runs)], check=True)
        if MODE == "tmpfs":
            subprocess.run(["mount", "-o", "remount,ro", str(disk.folder)], check=True)
        else:
            [p.chmod(0o555) for p in runs.rglob("*") if p.is_dir()]
        proc = run_module("pipeline.sample", f"paths.output_dir={runs}", "hydra.run.dir=" + str(tmp_path / "logs"),
                          "+obs_std=0.1", "n=4", check=False)
        line = one_error_line(proc.stderr)
        assert proc.returncode == 2 and line.startswith(f"error: cannot write {runs}/train/obs_std-0.1/")
        assert ("Read-only file system" if MODE == "tmpfs" else "Permission denied") in line
        assert "no picture was written and nothing else changed" in line
        assert run_module("pipeline.sample", f"paths.output_dir={runs}", "hydra.run.dir=" + str(tmp_path / "logs"),
                          "+obs_std=0.1", "n=4", f"out={tmp_path}/mine.png").returncode == 0
        if MODE == "tmpfs":
            subprocess.run(["mount", "-o", "remount,rw", str(disk.folder)], check=True)


def test_an_export_that_runs_out_of_space_keeps_the_old_one_and_overwrite_completes(tiny_runs, exported, tmp_path):
    size = sum(p.stat().st_size for p in exported.rglob("*") if p.is_file())
    common = [f"paths.output_dir={tiny_runs}", "+obs_std=0.1", f"crop.cascade={CASCADE}", "web.enabled=false"]
    with SmallDisk(tmp_path / "disk", size=int(1.5 * size)) as disk:
        disk.file_limit = (exported / "model.safetensors").stat().st_size // 2
        out = disk.folder / "faces-0.1"
        disk.limited = False
        assert disk.run("pipeline.export", *common, f"out={out}").returncode == 0
        disk.limited = True
        (out / "notes.txt").write_text("the old export, as it was handed over")
        before = {p: p.read_bytes() for p in disk.files()}
        proc = disk.run("pipeline.export", *common, f"out={out}", "overwrite=true")
        line = one_error_line(proc.stderr)
        assert proc.returncode == 2 and line.startswith(f"error: cannot write {out}")
        assert "out= is as it was" in line and "no partial folder is left" in line
        assert {p: p.read_bytes() for p in disk.files()} == before and no_partial_files(disk.folder)
        assert [p.name for p in disk.folder.iterdir()] == ["faces-0.1"]
        disk.make_room(int(3 * size))
        assert disk.run("pipeline.export", *common, f"out={out}", "overwrite=true").returncode == 0
        assert not (out / "notes.txt").exists() and no_partial_files(disk.folder)
        assert load(out).sample(2).shape == (2, 64, 64, 3)


@pytest.mark.slow
def test_the_explorer_keeps_serving_when_it_cannot_save_a_slider(tiny_runs, tmp_path):
    with SmallDisk(tmp_path / "disk", size=64 * MiB) as disk:
        runs = disk.folder / "outputs"
        subprocess.run(["cp", "-r", str(tiny_runs), str(runs)], check=True)
        proc, url, _ = start_explorer(runs, "hydra.run.dir=" + str(tmp_path / "logs"))
        try:
            codes = post(url, "sample", seed=5, n=8).json()["codes"]
            disk.fill(proc.pid)
            refused = post(url, "sliders", name="smile", has=codes[:4], lacks=codes[4:])
            assert refused.status_code == 507, refused.text
            error = refused.json()["error"]
            assert error.startswith(f"cannot write {runs}/train/obs_std-0.1/") and "sliders.json" in error
            assert "the slider 'smile' was not saved" in error and "the explorer goes on" in error
            assert post(url, "sample", seed=1, n=4).ok and requests.get(url + "api/runs", timeout=60).ok
            assert "smile" not in [s["name"] for s in requests.get(url + "api/runs", timeout=60).json()["runs"][0]
                                   ["sliders"]]
            assert no_partial_files(runs)
            disk.make_room()
            if MODE == "tmpfs":  # the explorer's own limit cannot be raised again from here
                made = post(url, "sliders", name="smile", has=codes[:4], lacks=codes[4:])
                assert made.ok and made.json()["sliders"][-1]["name"] == "smile"
        finally:
            proc.terminate()
            proc.wait(30)
