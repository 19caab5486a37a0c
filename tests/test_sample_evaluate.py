"""Sampling sheets, their error paths, and the evaluation numbers, on tiny models trained for a few steps
(conftest.py: `tiny_runs`, trained once per session; `runs_copy` where a test writes beside a checkpoint)."""
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.metrics import InceptionFeatures, features, fid_kid, nearest, sharpness
from pipeline.model import VAE
from pipeline.prior import answers, fit_gmm_prior, supported_components
from tests.helpers import run_module, run_process, synthetic_faces, train_args


def sample(out, *args, check=True):
    return run_module("pipeline.sample", f"paths.output_dir={out}", "device=cpu", *args, check=check)


def test_sampling_by_obs_std_is_deterministic_for_a_seed(tiny_runs, tmp_path):
    first = sample(tiny_runs, "+obs_std=0.1", f"out={tmp_path}/a.png")
    assert first.stdout.strip().splitlines()[-1] == f"{tmp_path}/a.png"
    sample(tiny_runs, "+obs_std=0.1", f"out={tmp_path}/b.png")
    sample(tiny_runs, "+obs_std=0.1", "seed=1", f"out={tmp_path}/c.png")
    a, b, c = (np.asarray(Image.open(tmp_path / f"{k}.png")) for k in "abc")
    assert a.shape == (8 * 66 + 2, 8 * 66 + 2, 3)  # 64 tiles of 64 px, 8 per row, 2 px padding
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_default_output_names_say_what_was_drawn(runs_copy):
    path = sample(runs_copy, "noise=true", "decoder=elbo", "n=16").stdout.strip().splitlines()[-1]
    assert path.endswith("samples_gmm_noisy_seed0_elbo.png") and Image.open(path).size == (8 * 66 + 2, 2 * 66 + 2)
    path = sample(runs_copy, "prior=normal", "n=8").stdout.strip().splitlines()[-1]
    assert path.endswith("samples_normal_means_seed0_sharp.png")
    for sheet in ("recon", "interp"):
        path = sample(runs_copy, f"sheet={sheet}", "n=16").stdout.strip().splitlines()[-1]
        assert path.endswith(f"{sheet}_seed0_sharp.png") and Image.open(path).size == (8 * 66 + 2, 66 * (4 if sheet == "recon" else 2) + 2)
    path = sample(runs_copy, "prior=gmm", "gmm_components=3", "n=8").stdout.strip().splitlines()[-1]
    assert path.endswith("samples_gmm_means_seed0_sharp.png")
    assert list(runs_copy.rglob("gmm_k3_*.pt"))  # not the stored 4-component prior: fitted and cached
    path = sample(runs_copy, "sheet=obs_std").stdout.strip().splitlines()[-1]
    assert Image.open(path).height == 2 * 66 + 2  # two runs_copy obs_std values: two rows


def test_missing_obs_std_lists_what_exists_and_how_to_train_it(tiny_runs):
    proc = sample(tiny_runs, "+obs_std=0.05", check=False)
    assert proc.returncode == 2
    assert "obs_std=0.05" in proc.stderr and "trained obs_std values: 0.1, 0.3" in proc.stderr
    assert 'make train ARGS="obs_std=0.05"' in proc.stderr


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tiny_runs, tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"\x80\x04 not a checkpoint")
    proc = sample(tiny_runs, f"ckpt={tmp_path}/broken.pt", check=False)
    assert proc.returncode == 2 and "not a readable checkpoint" in proc.stderr
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    proc = sample(tiny_runs, f"ckpt={tmp_path}/foreign.pt", check=False)
    assert proc.returncode == 2 and "not an animeface-vae checkpoint" in proc.stderr
    proc = sample(tmp_path / "empty", check=False)
    assert proc.returncode == 2 and "no trained run" in proc.stderr


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures("cpu")


@pytest.mark.slow
def test_fid_is_about_zero_for_a_set_against_itself_and_large_against_noise(small_data, inception):
    real = np.load(small_data / "test.npy")[:24]
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    feats_real, feats_noise = features(inception, real), features(inception, noise)
    assert feats_real.shape == (24, 2048)
    assert abs(fid_kid(feats_real, feats_real)["fid"]) < 1.0
    far = fid_kid(feats_real, feats_noise)
    assert far["fid"] > 100 and far["kid"] > 0.05


def test_sharpness_and_nearest_neighbours():
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, (4, 3, 16, 16), dtype=np.uint8)
    flat = np.full_like(sharp, 128)
    assert sharpness(sharp) > 100 * (sharpness(flat) + 1e-9) and sharpness(flat) == 0
    index, dist = nearest(sharp[[2, 0]], sharp)
    assert index.tolist() == [2, 0] and dist.max() == 0


@pytest.mark.slow
def test_evaluate_writes_metrics_json_with_every_number(runs_copy, tiny_data, tmp_path):
    reference = tmp_path / "other_faces"  # a second set of faces: 64 px tiles and one larger picture
    reference.mkdir()
    faces = np.load(tiny_data / "test.npy")[:5].transpose(0, 2, 3, 1)
    for k, face in enumerate(faces):
        Image.fromarray(face).save(reference / f"{k}.png")
    Image.fromarray(faces[0]).resize((100, 100)).save(reference / "big.jpg")
    proc = run_module("pipeline.evaluate", f"paths.output_dir={runs_copy}", "device=cpu", "+obs_std=0.1", "n=12",
                      "gmm_components=4", "nearest_n=12", "sheet_n=4", f"reference={reference}")
    path = proc.stdout.strip().splitlines()[-1]
    metrics = json.loads(open(path).read())
    assert metrics["n"] == 12 and metrics["obs_std"] == 0.1 and metrics["test_bpd"] > 0
    assert metrics["floor_train_vs_test"]["fid"] >= 0
    for decoder, prior in itertools.product(("priors", "sharp_priors"), ("normal", "gmm")):
        p = metrics[decoder][prior]
        assert p["fid"] > 0 and p["sharpness_ratio"] > 0 and p["memorisation_ratio"] > 0 and 0 <= p["near_copies"] <= 1
        assert p["reference"]["fid"] > 0 and p["reference"]["kid"] != p["kid"]
    assert metrics["priors"]["gmm"]["fid"] != metrics["sharp_priors"]["gmm"]["fid"]
    assert (Path(path).parent / "nearest_gmm_sharp.png").exists() and (Path(path).parent / "nearest_gmm.png").exists()
    assert metrics["reference"]["n"] == 6 and metrics["reference"]["floor_train_vs_reference"]["fid"] >= 0
    assert "| 0.1 |" in proc.stdout and f"({metrics['reference']['floor_train_vs_reference']['fid']:.1f}) |" \
        in proc.stdout
    assert metrics["fid_reliable"] is False and "n=12: an FID from fewer than 2000 samples" in proc.stdout
    report = run_module("pipeline.evaluate", f"paths.output_dir={runs_copy}", "report=true")
    assert report.stdout.count("| 0.1 |") == 4 and "| 0.3 |" not in report.stdout  # only the evaluated run
    assert report.stdout.count("| sharp |") == 2 and report.stdout.count("| elbo |") == 2


def test_a_multirun_sweep_over_obs_std_gives_one_sheet_row_per_value(tiny_data, tmp_path):
    run_module("pipeline.train", "--multirun", "obs_std=0.05,0.3", *train_args(tiny_data, tmp_path, "train.max_steps=4"))
    assert len(list((tmp_path / "sweep").rglob("ckpt.pt"))) == 2
    path = sample(tmp_path, "sheet=obs_std", "nrow=4").stdout.strip().splitlines()[-1]
    assert Image.open(path).height == 2 * 66 + 2
    proc = sample(tmp_path, "+obs_std=0.3", "n=4")
    assert "obs_std-0.3" in proc.stdout.strip().splitlines()[-1]


def test_noisy_samples_follow_the_runs_likelihood(tiny_data, tmp_path):
    """Gaussian: mean plus N(0, obs_std^2) noise; Bernoulli: a draw of each pixel, so only 0 or 1."""
    run_module("pipeline.train", *train_args(tiny_data, tmp_path, "likelihood=bernoulli", "train.max_steps=4"))
    noisy = np.asarray(Image.open(sample(tmp_path, "noise=true", "n=8").stdout.strip().splitlines()[-1]))
    means = np.asarray(Image.open(sample(tmp_path, "n=8").stdout.strip().splitlines()[-1]))
    assert set(np.unique(noisy)) <= {0, 255}
    assert not set(np.unique(means)) <= {0, 255}  # the means are grey levels, the draws are not


def test_the_default_grid_uses_the_stored_prior_and_needs_no_data(tiny_data, tmp_path):
    """Training stores its fitted mixture as prior.pt; sampling then needs only the run folder."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    run_module("pipeline.train", *train_args(data, tmp_path / "out", "train.max_steps=12", sharp_steps=6))
    run_dir = next((tmp_path / "out").rglob("ckpt.pt")).parent
    stored = torch.load(run_dir / "prior.pt", weights_only=True)
    assert stored["kind"] == "gmm" and stored["components"] == 4 and stored["step"] == 12  # the encoder's step
    with_data = sample(tmp_path / "out", "+obs_std=0.1", f"out={tmp_path}/with.png")
    assert "prior: gmm (the run's stored prior)" in with_data.stdout and "sharp decoder" in with_data.stdout

    shutil.move(data, tmp_path / "moved")  # the run folder alone, as if copied to another machine
    sample(tmp_path / "out", "+obs_std=0.1", f"out={tmp_path}/without.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "with.png")),
                          np.asarray(Image.open(tmp_path / "without.png")))
    sample(tmp_path / "out", "+obs_std=0.1", "sheet=obs_std")
    sample(tmp_path / "out", "+obs_std=0.1", "decoder=elbo", "noise=true")
    nowhere = f"paths.data_dir={tmp_path}/no-data"  # nor under paths.data_dir (the default data/ may hold faces)
    proc = sample(tmp_path / "out", "sheet=recon", nowhere, check=False)
    assert proc.returncode == 2 and f"test split not found at {data}/test.npy" in proc.stderr
    proc = sample(tmp_path / "out", "prior=gmm", "gmm_components=3", nowhere, check=False)
    assert proc.returncode == 2 and f"({data}/train.npy) is not there" in proc.stderr
    # asking for more than 400 codes support is answered by the stored 4-component mixture, without the data
    assert "prior: gmm" in sample(tmp_path / "out", "prior=gmm", "gmm_components=100").stdout

    (run_dir / "prior.pt").unlink()  # a run trained before priors were stored
    proc = sample(tmp_path / "out", check=False)
    assert proc.returncode == 2 and "prior=normal" in proc.stderr
    shutil.move(tmp_path / "moved", data)
    sample(tmp_path / "out", "gmm_components=3")  # fitted on first use, then stored
    assert torch.load(run_dir / "prior.pt", weights_only=True)["components"] == 3


def test_the_mixture_gets_at_most_one_component_per_hundred_training_codes(caplog):
    assert supported_components(100, 14992) == 100  # the default data: the default 100 components, unchanged
    assert supported_components(100, 400) == 4 and supported_components(3, 400) == 3
    assert supported_components(100, 99) == 1
    model = VAE(width=8, depth=4, latent_dim=8, decoder_width=8)
    prior = fit_gmm_prior(model, synthetic_faces(400), 100, seed=0, step=7)
    assert prior["components"] == len(prior["weights"]) == 4 and prior["codes"] == 400
    assert "400 training codes support at most 4 mixture components" in caplog.text
    assert answers(prior, 100) and answers(prior, 4) and not answers(prior, 3)


@pytest.mark.parametrize("module, args, message", [
    ("pipeline.sample", ["n=abc"], "n='abc' is not a whole number"),
    ("pipeline.sample", ["n=0"], "n=0 is out of range: it must be in [1, 100000]"),
    ("pipeline.sample", ["sheet=mosaic"], "sheet='mosaic': use one of samples, recon, interp, obs_std"),
    ("pipeline.sample", ["sheet=interp", "n=800"], "sheet needs 2 x n/nrow = 2 x 100 test faces"),
    ("pipeline.sample", ["sheet=recon", "n=800"], "sheet needs n test faces"),
    ("pipeline.evaluate", ["n=0"], "n=0: use auto or a whole number of samples >= 2"),
    ("pipeline.evaluate", ["n=abc"], "n='abc': use auto"),
    ("pipeline.evaluate", ["priors=default"], "priors='default' is not a list"),
    ("pipeline.evaluate", ["reference=/no/such/faces"], "reference=/no/such/faces is neither a folder of face"),
])
def test_bad_sample_and_evaluate_values_are_one_line_errors(tiny_runs, module, args, message):
    before = sorted(p for p in tiny_runs.rglob("*") if p.is_file())
    proc = run_module(module, f"paths.output_dir={tiny_runs}", "device=cpu", *args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr
    assert sorted(p for p in tiny_runs.rglob("*") if p.is_file()) == before  # nothing left behind, not even a log


@pytest.mark.slow
@pytest.mark.parametrize("module, arg, message", [("pipeline.sample", "n=0", "n=0 is out of range"),
                                                  ("pipeline.evaluate", "n=0", "n=0: use auto")])
def test_a_bad_value_is_one_line_from_a_process_of_its_own(tiny_runs, module, arg, message):
    """The same contract as above, seen from outside: exit status 2 and nothing on stderr but that line."""
    proc = run_process(module, f"paths.output_dir={tiny_runs}", "device=cpu", arg, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"]
    assert message in proc.stderr


def test_out_may_name_a_folder_or_a_file(tiny_runs, tmp_path):
    assert sample(tiny_runs, f"out={tmp_path}", "n=4").stdout.strip().splitlines()[-1] == \
        str(tmp_path / "samples_gmm_means_seed0_sharp.png")
    assert (tmp_path / "samples_gmm_means_seed0_sharp.png").is_file()
    (tmp_path / "blocker").write_text("a file where a folder should be")
    proc = run_module("pipeline.sample", f"paths.output_dir={tmp_path / 'blocker'}", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: cannot write {tmp_path / 'blocker'}")
    assert "Traceback" not in proc.stderr and (tmp_path / "blocker").read_text() == "a file where a folder should be"


def test_the_sharp_decoder_draws_by_default_and_decoder_elbo_draws_the_exact_one(tiny_runs, tmp_path):
    sharp = sample(tiny_runs, "+obs_std=0.1", f"out={tmp_path}/sharp.png")
    assert "sharp decoder" in sharp.stderr + sharp.stdout
    elbo = sample(tiny_runs, "+obs_std=0.1", "decoder=elbo", f"out={tmp_path}/elbo.png")
    assert "elbo decoder (decoder=elbo; the run also has a sharp one)" in elbo.stderr + elbo.stdout
    sample(tiny_runs, "+obs_std=0.1", "decoder=sharp", f"out={tmp_path}/explicit.png")
    a, b, c = (np.asarray(Image.open(tmp_path / f"{k}.png")) for k in ("sharp", "elbo", "explicit"))
    assert not np.array_equal(a, b) and np.array_equal(a, c)  # same codes, two decoders
    old = sample(tiny_runs, "+obs_std=0.3", "n=4", f"out={tmp_path}/old.png")
    assert "elbo decoder" in old.stdout + old.stderr


@pytest.mark.parametrize("args, message", [
    (["+obs_std=0.3", "decoder=sharp"], "has no sharp decoder"),
    (["+obs_std=0.1", "decoder=blurry"], "decoder='blurry'"),
    (["+obs_std=0.1", "noise=true"], "add decoder=elbo"),
])
def test_decoder_mistakes_are_one_line(tiny_runs, args, message):
    proc = sample(tiny_runs, *args, "n=4", check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
