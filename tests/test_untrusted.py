"""An export folder is a file from a stranger, and a run folder can be damaged on disk: every case is one line
(exit 2; a ValueError in Python) and no picture, on tampered copies of the session's tiny runs and their export."""
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline import load
from tests.helpers import run_module


def refused(ckpt, tmp_path, *args) -> str:
    """pipeline.sample of `ckpt`: exit 2, one line on stderr, shown once, no traceback and no picture; the line."""
    png = tmp_path / "grid.png"
    proc = run_module("pipeline.sample", f"paths.output_dir={tmp_path}/no-outputs", "device=cpu", f"ckpt={ckpt}",
                      f"out={png}", *args, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    message = proc.stderr[len("error: "):].strip()
    assert (proc.stdout + proc.stderr).count(message) == 1, "the error is shown twice"
    assert "Traceback" not in proc.stdout + proc.stderr and not png.exists()
    return message


def tampered_copy(exported: Path, tmp_path: Path, config=None, model=None, prior=None, metadata=None) -> Path:
    """A copy of the export with config.json's fields, model.safetensors' or prior.safetensors' tensors (a function
    of the originals) or the prior's "fit" metadata changed."""
    copy = shutil.copytree(exported, tmp_path / "received")
    if config:
        document = json.loads((copy / "config.json").read_text())
        config(document)
        (copy / "config.json").write_text(json.dumps(document))
    if model:
        save_file(model(load_file(copy / "model.safetensors")), copy / "model.safetensors")
    if prior or metadata:
        with safe_open(copy / "prior.safetensors", "pt") as f:
            fit = json.loads(f.metadata()["fit"])
        tensors = load_file(copy / "prior.safetensors")
        if metadata:
            metadata(fit)
        save_file(prior(tensors) if prior else tensors, copy / "prior.safetensors", metadata={"fit": json.dumps(fit)})
    return copy


def setter(dotted: str, value):
    def change(document):
        *parents, last = dotted.split(".")
        for name in parents:
            document = document[name]
        if value is KeyError:
            del document[last]
        else:
            document[last] = value
    return change


@pytest.mark.parametrize("field, value, expected", [
    ("model_args.latent_dim", 10 ** 9, "model_args.latent_dim is 1000000000, not a whole number from 1 to 65536"),
    ("model_args.width", 64, "model.safetensors: its tensors do not fit the model"),  # in range, not the weights
    ("model_args.upsample", "bicubic", "model_args.upsample is 'bicubic', not one of transposed, nearest"),
    ("obs_std", "abc", "obs_std is 'abc', not a number from 1e-06 to 1000"),
    ("obs_std", -1, "obs_std is -1, not a number from 1e-06 to 1000"),
    ("likelihood", "laplace", "likelihood is 'laplace', not one of gaussian, bernoulli"),
    ("data", 5, "data is 5, not an object"),
    ("data.train_file", "../../home/train.npy", "data.train_file is '../../home/train.npy', not a file name"),
    ("step", KeyError, "step is missing"),
    ("decoders", ["sharp"], "decoders is ['sharp'], without elbo"),
    ("image_size", 128, "image_size is 128 but model_args.image_size is 64"),
    ("training", "x", "training is 'x', not an object"),
    ("metrics", {"n": 10, "floor_fid": 1.0, "rows": {"elbo": {"default": {"fid": "low"}}}},
     "metrics.rows.elbo.default.fid is 'low', not a number"),
])
def test_every_config_field_is_checked_before_anything_is_built(exported, tmp_path, field, value, expected):
    received = tampered_copy(exported, tmp_path, config=setter(field, value))
    message = refused(received, tmp_path)
    assert message.startswith(str(received)) and expected in message, message
    with pytest.raises(ValueError, match=re.escape(expected)):
        load(received, device="cpu")


def nan_at(name: str, index=0):
    def change(tensors):
        tensor = tensors[name].clone()
        tensor.view(-1)[index] = float("nan")
        return {**tensors, name: tensor}
    return change


def replaced(name: str, make):
    return lambda tensors: {**tensors, name: make(tensors[name])}


@pytest.mark.parametrize("part, change, expected", [
    ("model", nan_at("decoder.1.weight"), "the tensor decoder.1.weight holds NaN or infinite values"),
    ("model", nan_at("sharp.project.weight"), "the tensor sharp.project.weight holds NaN or infinite values"),
    ("model", replaced("project.weight", torch.Tensor.half), "project.weight is (2048, 32) torch.float16, not (2048, "
                                                             "32) torch.float32"),
    ("prior", nan_at("means"), "the prior's means holds NaN or infinite values"),
    ("prior", nan_at("cholesky"), "the prior's cholesky holds NaN or infinite values"),
    ("prior", replaced("weights", lambda w: w - w.max()), "weights are not a distribution"),
    ("prior", replaced("weights", lambda w: w * 2), "weights are not a distribution (they must be >= 0 and sum to 1; "
                                                    "they sum to 2)"),
    ("prior", replaced("means", lambda m: m[:, :16].contiguous()), "shapes disagree"),
    ("prior", replaced("cholesky", lambda c: c.transpose(1, 2).contiguous()), "not lower-triangular"),
])
def test_every_tensor_is_checked_before_a_face_is_drawn(exported, tmp_path, part, change, expected):
    received = tampered_copy(exported, tmp_path, **{part: change})
    message = refused(received, tmp_path)
    assert message.startswith(str(received / f"{part}.safetensors")) and expected in message, message
    with pytest.raises(ValueError, match=re.escape(expected)):
        load(received, device="cpu").sample(4)


def test_the_hair_colours_and_the_prior_fit_are_checked_too(exported, tmp_path):
    colour = load(exported, device="cpu").hair_colours()[0]
    received = tampered_copy(exported, tmp_path, prior=nan_at(f"hair.{colour}.mean"))
    assert load(received, device="cpu").sample(2).shape == (2, 64, 64, 3)  # only hair= uses the colour's Gaussian
    assert f"the hair colour {colour}.mean holds NaN" in refused(received, tmp_path, f"hair={colour}")
    shutil.rmtree(received)
    received = tampered_copy(exported, tmp_path, metadata=setter("components", "many"))
    assert "prior.safetensors: components is 'many', not a whole number" in refused(received, tmp_path)
    shutil.rmtree(received)
    received = tampered_copy(exported, tmp_path, metadata=lambda fit: fit["hair"]["colours"].update(teal=30),
                             prior=lambda t: {**t, **{f"hair.teal.{k}": t[f"hair.{colour}.{k}"].clone()
                                                      for k in ("mean", "cholesky", "direction")}})
    assert "'teal' is not a colour of the labeller's palette" in refused(received, tmp_path, f"hair={colour}")


def test_a_run_folder_damaged_on_disk_is_refused_too(runs_copy, tmp_path):
    run_dir = next(runs_copy.glob("train/obs_std-0.1/*/"))
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    ckpt["sharp"]["decoder"]["project.weight"][0, 0] = float("inf")
    torch.save(ckpt, run_dir / "ckpt.pt")
    assert "the sharp decoder's weight project.weight holds NaN or infinite values" in refused(run_dir, tmp_path)
    ckpt["sharp"]["decoder"]["project.weight"][0, 0] = 0.0
    torch.save(ckpt, run_dir / "ckpt.pt")
    colour = load(run_dir, device="cpu").hair_colours()[0]
    for name, spoil, args, expected in (
            ("prior.pt", lambda p: p["means"].view(-1).__setitem__(0, float("nan")), (), "the prior's means holds NaN"),
            ("hair.pt", lambda h: h["colours"][colour]["cholesky"].fill_(float("nan")), (f"hair={colour}",),
             f"the hair colour {colour}.cholesky holds NaN")):
        stored = torch.load(run_dir / name, weights_only=True)
        spoil(stored)
        torch.save(stored, run_dir / name)
        message = refused(run_dir, tmp_path, *args)
        assert message.startswith(str(run_dir / name)) and expected in message, message
        with pytest.raises(ValueError, match=re.escape(expected)):
            load(run_dir, device="cpu").sample(2, hair=colour if args else None)
        (run_dir / name).unlink()  # a run whose training split is there fits it again


def test_the_api_refuses_what_the_command_line_refuses_in_the_same_words(exported, tmp_path):
    model = load(exported, device="cpu")
    for key, value, words in (("temperature", -1, "temperature=-1.0 is out of range: it must be in [0.0, 3.0]"),
                              ("seed", -1, "seed=-1 is out of range: it must be in [0, 9223372036854775807]"),
                              ("seed", "x", "seed='x' is not a whole number"),
                              ("n", 0, "n=0 is out of range: it must be in [1, 100000]")):
        with pytest.raises(ValueError, match=re.escape(words)):
            model.sample(**{"n": 4, key: value})
        assert words in refused(exported, tmp_path, f"{key}={value}")
    assert np.array_equal(model.sample(2, seed=np.int64(3)), model.sample(2, seed=3))
    with pytest.raises(ValueError, match="an empty batch of images: pass at least one face"):
        model.encode(np.zeros((0, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="an empty batch of codes: pass at least one code of 32 numbers"):
        model.decode(np.zeros((0, 32), np.float32))


def test_a_colour_not_offered_is_refused_before_anything_is_announced(exported, tmp_path):
    proc = run_module("pipeline.sample", f"paths.output_dir={tmp_path}", f"ckpt={exported}", "hair=teal",
                      f"out={tmp_path}/x.png", check=False)
    assert proc.returncode == 2 and "hair=teal: not a colour" in proc.stderr
    assert "prior:" not in proc.stdout + proc.stderr


def test_the_export_carries_no_local_path(exported, tiny_data):
    for name in ("README.md", "config.json"):
        text = (exported / name).read_text()
        assert str(tiny_data) not in text and str(Path.home()) + "/" not in text and "/tmp" not in text, name
    command = json.loads((exported / "config.json").read_text())["training"]["command"]
    assert "paths.data_dir=DATA_DIR" in command and "paths.output_dir=OUTPUT_DIR" in command and "obs_std=0.1" in command


def test_paths_data_dir_finds_a_run_s_moved_splits_and_refuses_another_data_set(runs_copy, tiny_data, tmp_path,
                                                                               caplog):
    run_dir = next(runs_copy.glob("train/obs_std-0.1/*/"))
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert ckpt["faces"] == {"train": 400, "test": 80}
    ckpt["config"]["train"].update(train_file="/gone/data/train.npy", test_file="/gone/data/test.npy")
    torch.save(ckpt, run_dir / "ckpt.pt")
    moved = shutil.copytree(tiny_data, tmp_path / "moved")
    common = ("pipeline.sample", f"ckpt={run_dir}", "device=cpu", "sheet=recon", "n=4", "nrow=4")
    gone = run_module(*common, f"paths.data_dir={tmp_path}/nowhere", f"out={tmp_path}/a.png", check=False)
    assert gone.returncode == 2 and "test split not found at /gone/data/test.npy" in gone.stderr
    run_module(*common, f"paths.data_dir={moved}", f"out={tmp_path}/b.png")
    assert (tmp_path / "b.png").is_file()
    explorer_view = load(run_dir, device="cpu", data_dir=moved).run
    assert explorer_view.has_split("train") and explorer_view.split_path("train") == moved / "train.npy"
    other = tmp_path / "other"
    other.mkdir()
    np.save(other / "test.npy", np.load(moved / "test.npy")[:50])
    proc = run_module(*common, f"paths.data_dir={other}", f"out={tmp_path}/c.png", check=False)
    assert proc.returncode == 2 and f"{other}/test.npy holds 50 faces, but {run_dir} was trained on 80 test faces" \
        in proc.stderr and not (tmp_path / "c.png").exists()
    del ckpt["faces"]  # a run trained before the counts were recorded: used, with a warning that says so
    torch.save(ckpt, run_dir / "ckpt.pt")
    with caplog.at_level(logging.WARNING):
        assert load(run_dir, device="cpu", data_dir=other).run.split("test").shape[0] == 50
    assert "/gone/data/test.npy is gone; using" in caplog.text and "cannot be checked" in caplog.text


def test_a_good_export_still_loads_as_before(exported, tiny_runs):
    run = load(obs_std=0.1, output_dir=tiny_runs, device="cpu")
    assert np.array_equal(load(exported, device="cpu").sample(6, seed=2), run.sample(6, seed=2))
