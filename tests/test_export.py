"""`python -m pipeline.export` and the Python entry point `pipeline.load`, on the session's tiny runs
(conftest.py: obs_std 0.1 has a sharp decoder, 0.3 has none)."""
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import load_file, save_file

from pipeline import load
from pipeline.attributes import make_slider
from pipeline.bundle import EXPORT_FORMAT
from pipeline.config import checked
from pipeline.errors import RunNotFound, WriteError
from pipeline.explore import BadRequest, Explorer, ExploreJob
from pipeline.export import write_folder
from pipeline.faces import only_detector_keys
from tests.helpers import CASCADE, ROOT, export, run_module

FILES = {"model.safetensors", "prior.safetensors", "config.json", "README.md", "samples.png",
         "lbpcascade_animeface.xml"}


def sample_png(*args) -> np.ndarray:
    path = run_module("pipeline.sample", "device=cpu", *args).stdout.strip().splitlines()[-1]
    return np.asarray(Image.open(path))


def test_the_export_is_safetensors_a_config_a_model_card_and_the_cascade(exported):
    assert {p.name for p in exported.iterdir()} == FILES
    for name in ("model.safetensors", "prior.safetensors"):
        header = (exported / name).read_bytes()
        assert header[8:9] == b"{"  # a safetensors header: JSON after its length, nothing to unpickle
    tensors = load_file(exported / "model.safetensors")
    assert "encoder.0.0.weight" in tensors and any(k.startswith("sharp.decoder.") for k in tensors)
    prior = load_file(exported / "prior.safetensors")
    colours = load(exported).hair_colours()
    assert colours and set(prior) == {"weights", "means", "cholesky", *(f"hair.{c}.{k}" for c in colours
                                                                      for k in ("mean", "cholesky", "direction"))}
    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == EXPORT_FORMAT and config["obs_std"] == 0.1 and config["decoders"] == ["elbo", "sharp"]
    assert config["step"] == 25 and config["encoder_step"] == 15 and config["model_args"]["latent_dim"] == 32
    assert config["data"]["train_file"] == "train.npy" and isinstance(config["test_elbo"], float)
    assert config["training"]["command"].startswith("python -m pipeline.train ") and "obs_std=0.1" in \
        config["training"]["command"]
    card = (exported / "README.md").read_text()
    for expected in ("obs_std=0.1", "Test ELBO:", "python -m pipeline.train", "![samples.png](samples.png)",
                     "from pipeline import load", "Not evaluated at this step", "uploads in the explorer work"):
        assert expected in card
    assert (exported / "lbpcascade_animeface.xml").read_bytes() == Path(CASCADE).read_bytes()


def test_export_then_load_gives_the_pixels_of_the_run(exported, tiny_runs, tmp_path):
    for decoder in ("auto", "elbo"):
        run = load(obs_std=0.1, output_dir=tiny_runs, device="cpu", decoder=decoder)
        again = load(exported, device="cpu", decoder=decoder, data_dir=tmp_path / "no-data")
        assert run.decoder == again.decoder == ("sharp" if decoder == "auto" else "elbo")
        faces = run.sample(9, seed=4)
        assert faces.shape == (9, 64, 64, 3) and faces.dtype == np.uint8
        assert np.array_equal(faces, again.sample(9, seed=4)) and not np.array_equal(faces, run.sample(9, seed=5))
        assert np.array_equal(run.encode(faces), again.encode(faces))
        assert np.array_equal(run.reconstruct(faces), again.reconstruct(faces))
        colour = run.hair_colours()[0]
        assert again.hair_colours() == run.hair_colours() and again.sliders() == run.sliders()
        steered = run.sample(4, hair=colour, steer={colour: 1.0})
        assert np.array_equal(steered, again.sample(4, hair=colour, steer={colour: 1.0}))
        assert not np.array_equal(steered, run.sample(4, hair=colour))
    grid = sample_png(f"paths.output_dir={tmp_path}/no-outputs", f"ckpt={exported}", f"out={tmp_path}/grid.png")
    assert np.array_equal(grid, np.asarray(Image.open(exported / "samples.png")))  # the card shows what samples
    assert np.array_equal(grid, sample_png(f"paths.output_dir={tiny_runs}", "+obs_std=0.1", f"out={tmp_path}/r.png"))


def test_exporting_the_same_run_twice_gives_the_same_bytes(exported, tiny_runs, tmp_path):
    again = tmp_path / "again"
    export(tiny_runs, "+obs_std=0.1", f"out={again}")
    export(tiny_runs, "+obs_std=0.1", f"out={again}", "overwrite=true")
    assert {p.name: p.read_bytes() for p in again.iterdir()} == {p.name: p.read_bytes() for p in exported.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temp folder left beside it
    run_module("pipeline.export", f"paths.output_dir={tmp_path}/no-outputs", f"ckpt={exported}",  # the default
               f"out={tmp_path}/of-the-export", f"crop.cascade_cache_dir={tmp_path}/no-cache",  # cascade URL, unused
               "web.enabled=false")
    assert {p.name: p.read_bytes() for p in (tmp_path / "of-the-export").iterdir()} == \
        {p.name: p.read_bytes() for p in exported.iterdir()}  # an export exported again: the same folder


def test_the_api_takes_what_a_notebook_holds(exported):
    model = load(exported, device="cpu")
    faces = model.sample(3, seed=1)
    codes = model.encode(faces)
    assert codes.shape == (3, 32) and codes.dtype == np.float32
    as_pil = model.encode([Image.fromarray(f) for f in faces])
    as_tensor = model.encode(torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255)
    assert np.allclose(as_pil, codes) and np.allclose(as_tensor, codes, atol=1e-5)
    assert np.allclose(model.encode(faces[0]), codes[:1], atol=1e-5) and model.decode(codes[0]).shape == (1, 64, 64, 3)
    assert "obs_std=0.1" in repr(model) and model.decoders == ["elbo", "sharp"]
    for bad, message in ((faces[:, :32, :32], "images are 32x32; the model takes 64x64 faces"),
                         (faces.astype(np.float32), "pass uint8 (0-255) or floats in [0, 1]"),
                         (faces[..., 0], "pass N x H x W x 3")):
        with pytest.raises(ValueError, match=re.escape(message)):
            model.encode(bad)
    with pytest.raises(ValueError, match="pass N x 32 finite numbers"):
        model.decode(np.full((1, 32), np.inf))
    with pytest.raises(ValueError, match=re.escape("n=0 is out of range: it must be in [1, 100000]")):
        model.sample(0)


def test_the_readme_example_runs_as_written(tiny_runs, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"<!-- tested by tests/test_export.py -->\n```python\n(.*?)```", readme, re.S)
    assert example, "README.md lost its Python example (the block after <!-- tested by tests/test_export.py -->)"
    shutil.copytree(tiny_runs, tmp_path / "outputs")
    monkeypatch.chdir(tmp_path)
    exec(compile(example.group(1), "README.md", "exec"), {})
    assert Image.open(tmp_path / "faces.png").size == (16 * 64, 2 * 64)  # the samples above their reconstructions


def explorer(tmp_path, ckpt: Path, *overrides) -> Explorer:
    """The explorer of `ckpt` (a checkpoint file) as `pipeline.explore` builds it, without its server."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("explore", overrides=[f"ckpt={ckpt}", f"paths.output_dir={tmp_path}/no-outputs",
                                            f"paths.data_dir={tmp_path}/no-data", "device=cpu", *overrides])
    return Explorer(checked(only_detector_keys(cfg), ExploreJob), ckpt, torch.device("cpu"))


def test_an_export_explores_and_takes_uploads_with_data_and_outputs_away(exported, tmp_path):
    handed = shutil.copytree(exported, tmp_path / "handed-over")
    page = explorer(tmp_path, handed / "model.safetensors", f"crop.cascade_cache_dir={tmp_path}/no-cache")  # default: the URL
    assert page.uploads_off == ""  # the export's own cascade, found before any download
    loaded = page.get("0")
    drawn = loaded.sample(seed=0, prior="default", temperature=1.0, noise=False, n=4, decoder=None)
    assert len(drawn["images"]) == 4 and loaded.describe()["decoders"] == ["sharp", "elbo"]
    tile = Image.open(handed / "samples.png").crop((2, 2, 66, 66))
    buffer = io.BytesIO()
    tile.save(buffer, format="PNG")
    assert len(page.upload("0", "tile.png", buffer.getvalue())["codes"]) == 1
    with pytest.raises(BadRequest, match="the training split .* is not there"):
        loaded.nearest(torch.zeros(1, 32))


def test_the_explorer_without_a_cascade_says_uploads_are_off_before_any_upload(tiny_runs, tmp_path):
    ckpt = next(tiny_runs.glob("train/obs_std-0.1/*/ckpt.pt"))
    page = explorer(tmp_path, ckpt, "crop.cascade=/nowhere/lbpcascade_animeface.xml")
    assert page.uploads_off.startswith("Uploads are off: crop.cascade=/nowhere/lbpcascade_animeface.xml does not "
                                       "exist") and "start pipeline.explore again" in page.uploads_off


def test_bad_folders_and_files_are_one_line_errors(exported, tiny_runs, tmp_path):
    def sample_error(ckpt):
        proc = run_module("pipeline.sample", f"paths.output_dir={tiny_runs}", "device=cpu", f"ckpt={ckpt}",
                          f"out={tmp_path}/x.png", check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        return proc.stderr
    (tmp_path / "empty").mkdir()
    assert "is neither a run folder (no ckpt.pt) nor an export folder" in sample_error(tmp_path / "empty")
    with pytest.raises(RunNotFound, match="is neither a run folder"):
        load(tmp_path / "empty")
    wrong = shutil.copytree(exported, tmp_path / "wrong")
    save_file({"x": torch.zeros(2)}, wrong / "model.safetensors")
    assert "model.safetensors: its tensors do not fit the model" in sample_error(wrong)
    tensors = load_file(exported / "model.safetensors")
    save_file({**tensors, "project.weight": tensors["project.weight"][:, :8].contiguous()}, wrong / "model.safetensors")
    assert re.search(r"project.weight is \(\d+, 8\) torch.float32, not \(\d+, 32\)", sample_error(wrong))
    (wrong / "model.safetensors").write_bytes(b"not safetensors")
    assert "is not a readable safetensors file" in sample_error(wrong)
    (wrong / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    assert "config.json is not an animeface-vae export's config" in sample_error(wrong)


def test_bad_destinations_are_refused_and_leave_nothing_behind(tiny_runs, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    proc = export(tiny_runs, "+obs_std=0.1", f"out={taken}", check=False)
    assert proc.returncode == 2 and "exists and is not empty: choose another out=, or add overwrite=true" in proc.stderr
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    proc = export(tiny_runs, "+obs_std=0.1", f"out={tmp_path}/new", "crop.cascade=/nowhere/cascade.xml", check=False)
    assert proc.returncode == 2 and "crop.cascade=/nowhere/cascade.xml does not exist" in proc.stderr
    assert "cascade=false" in proc.stderr and not (tmp_path / "new").exists()
    read_only = Path("/sys/fs/animeface-export")  # a read-only file system, even for root
    proc = export(tiny_runs, "+obs_std=0.1", f"out={read_only}", check=False)
    assert proc.returncode == 2 and f"out={read_only}: /sys/fs cannot be written (" in proc.stderr
    with pytest.raises(WriteError, match="cannot write .*/half/config.json/under/a/file.bin: Not a directory"):
        write_folder(tmp_path / "half", {"config.json": b"{}", "config.json/under/a/file.bin": b"x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert export(tiny_runs, "+obs_std=0.3", f"out={tmp_path}/plain", "cascade=false").returncode == 0
    assert "sharp" not in json.loads((tmp_path / "plain" / "config.json").read_text())["decoders"]
    assert "lbpcascade_animeface.xml" not in {p.name for p in (tmp_path / "plain").iterdir()}


@pytest.mark.slow
def test_evaluate_scores_an_export_with_the_splits_under_paths_data_dir(exported, tiny_data, tmp_path):
    handed = shutil.copytree(exported, tmp_path / "handed-over")
    common = (f"ckpt={handed}", f"paths.output_dir={tmp_path}/outputs", "device=cpu", "n=12", "gmm_components=4",
              "nearest_n=12", "sheet_n=4")
    proc = run_module("pipeline.evaluate", f"paths.data_dir={tiny_data}", *common)
    metrics = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    assert metrics["ckpt"] == str(handed / "model.safetensors") and metrics["step"] == 25
    assert set(metrics["priors"]) == set(metrics["sharp_priors"]) == {"normal", "gmm"}
    missing = run_module("pipeline.evaluate", f"paths.data_dir={tmp_path}/no-data", *common, check=False)
    assert missing.returncode == 2 and f"train split not found at {tmp_path}/no-data/train.npy" in missing.stderr


def test_sliders_made_for_a_run_travel_with_its_export(tiny_runs, tmp_path):
    runs = shutil.copytree(tiny_runs, tmp_path / "outputs")
    run = load(obs_std=0.1, output_dir=runs, device="cpu").run
    codes = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    run.add_slider(make_slider("smile", codes[:4], codes[4:], taken=()))
    export(runs, "+obs_std=0.1", f"out={tmp_path}/handed")
    assert (tmp_path / "handed" / "sliders.json").read_bytes() == (run.ckpt_path.parent / "sliders.json").read_bytes()
    assert load(tmp_path / "handed").sliders()[-1] == "smile"
