"""Short CPU trainings: on real faces the test ELBO improves; on synthetic ones (no real data needed)
kills resume exactly, SIGTERM saves, DDP runs and bad input fails clearly."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipeline.runs import load_checkpoint
from pipeline.train import kl_weight
from tests.helpers import ROOT, run_module, run_process, train_args


def only_run(out_dir):
    runs = [p.parent for p in out_dir.rglob("ckpt.pt")]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_short_training_improves_the_test_elbo_and_writes_its_outputs(small_data, tmp_path):
    run_module("pipeline.train", *train_args(small_data, tmp_path, "train.epochs=4", "train.lr=3e-3"))
    run = only_run(tmp_path)
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r["test_elbo"]]
    assert len(rows) == 4
    elbos = [float(r["test_elbo"]) for r in rows]
    assert elbos[-1] > elbos[0] + 100, elbos
    assert all(float(r["test_bpd"]) > 0 for r in rows)
    assert (run / "samples_epoch004.png").exists() and (run / "recon_epoch004.png").exists()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert OmegaConf.load(run / "config.yaml").obs_std == 0.1
    ckpt = load_checkpoint(run / "ckpt.pt")
    assert ckpt["step"] == 4 * (len(np.load(small_data / "train.npy")) // 32)


def test_eval_every_spaces_the_test_elbo_and_grids_and_the_last_step_is_always_evaluated(tiny_data, tmp_path):
    run_module("pipeline.train", *train_args(tiny_data, tmp_path, "train.epochs=5", "train.eval_every=2"))
    run = only_run(tmp_path)
    steps_per_epoch = len(np.load(tiny_data / "train.npy")) // 32
    tested = [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv")) if r["test_elbo"]]
    assert tested == [2 * steps_per_epoch, 4 * steps_per_epoch, 5 * steps_per_epoch]
    assert sorted(p.name for p in run.glob("samples_epoch*.png")) == \
        ["samples_epoch002.png", "samples_epoch004.png", "samples_epoch005.png"]


def every_tensor(ckpt: dict) -> dict:
    """The VAE's weights, their average (train.ema) and the sharp decoder's phase, by one flat name each."""
    parts = {"ema": ckpt.get("ema", {}), **{k: ckpt["sharp"][k] for k in ("decoder", "disc")}}
    return {**ckpt["model"], **{f"{part}.{k}": v for part, tensors in parts.items() for k, v in tensors.items()}}


def wait_for_checkpoint(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.01)
    return False


def start_training(args):
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("ema, design", [("train.ema=0", "after"), ("train.ema=0.9", "after"), ("train.ema=0", "joint")])
def test_sigkill_then_resume_gives_the_same_parameters_as_an_uninterrupted_run(tiny_data, tmp_path, ema, design):
    # one thread count throughout; the VAE's 80 steps, then 10 of the sharp decoder (or 10 beside the VAE's last
    # 8 and 2 after them): the resume crosses the phases
    joint = ["sharp.joint_from=72"] if design == "joint" else []
    common = ["train.max_steps=80", "train.ckpt_every=5", "train.num_threads=2", ema, *joint]
    run_module("pipeline.train", *train_args(tiny_data, tmp_path / "straight", *common, sharp_steps=10))
    straight = every_tensor(load_checkpoint(only_run(tmp_path / "straight") / "ckpt.pt"))

    out = tmp_path / "killed"
    proc = start_training(train_args(tiny_data, out, *common, sharp_steps=10))
    ckpt_dir = None
    deadline = time.monotonic() + 120
    while ckpt_dir is None and time.monotonic() < deadline and proc.poll() is None:
        found = list(out.rglob("ckpt.pt"))
        ckpt_dir = found[0].parent if found else None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert ckpt_dir is not None, "no checkpoint appeared before the run ended"
    killed_at = load_checkpoint(ckpt_dir / "ckpt.pt")["step"]
    assert killed_at < 80, "the run finished before it could be killed"
    run_module("pipeline.train", *train_args(tiny_data, out, *common, f"resume={ckpt_dir}", sharp_steps=10))
    resumed = every_tensor(load_checkpoint(ckpt_dir / "ckpt.pt"))
    assert ("ema.project.weight" in resumed) == (ema == "train.ema=0.9") and "disc.net.0.weight" in resumed
    assert load_checkpoint(ckpt_dir / "ckpt.pt")["step"] == (82 if joint else 90)
    assert torch.load(ckpt_dir / "prior.pt", weights_only=True)["step"] == 80  # refitted when the resumed run ended
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".part")]  # a killed save's temp file is gone
    steps = [int(r["step"]) for r in csv.DictReader(open(ckpt_dir / "metrics.csv"))]
    assert steps == sorted(set(steps))  # rows logged after the last checkpoint are not repeated
    for name, value in straight.items():
        assert torch.allclose(value.float(), resumed[name].float(), rtol=1e-5, atol=1e-6), name


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["vae", "sharp", "joint"])
def test_sigterm_saves_a_checkpoint_before_exiting(tiny_data, tmp_path, phase):
    steps = {"vae": ["train.max_steps=100000"], "sharp": ["train.max_steps=10"],
             "joint": ["train.max_steps=100000", "sharp.joint_from=5"]}[phase]
    proc = start_training(train_args(tiny_data, tmp_path, *steps, "train.ckpt_every=100000",
                                     sharp_steps=0 if phase == "vae" else 100000))
    metrics = None
    deadline = time.monotonic() + 120
    rows_before_stop = 3 if phase == "sharp" else 2  # two rows logged (three in the sharp phase)
    while metrics is None and time.monotonic() < deadline:
        found = list(tmp_path.rglob("metrics.csv"))
        metrics = found[0] if found and len(found[0].read_text().splitlines()) > rows_before_stop else None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    ckpt = load_checkpoint(metrics.parent / "ckpt.pt")
    assert 10 <= ckpt["step"] < 100000 and ("sharp" in ckpt) == (phase != "vae")
    assert torch.load(metrics.parent / "prior.pt", weights_only=True)["step"] == ckpt["encoder_step"]
    assert ckpt["encoder_step"] == (10 if phase == "sharp" else ckpt["step"])  # stored before exiting
    assert phase != "joint" or ckpt["sharp"]["steps_done"] == ckpt["step"] - 5
    assert "resume with" in err


@pytest.mark.slow
@pytest.mark.parametrize("joint", [[], ["sharp.joint_from=10"]], ids=["after", "joint"])
def test_two_process_torchrun_on_cpu_completes_with_rank_zero_owning_outputs(tiny_data, tmp_path, joint):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "pipeline.train", *train_args(tiny_data, tmp_path, "train.max_steps=12", *joint,
                                                               sharp_steps=4)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tmp_path)
    assert [p.name for p in (tmp_path / "train").rglob("*") if p.is_dir() and p.parent.name.startswith("obs_std-")] \
        == [run.name]
    ckpt = load_checkpoint(run / "ckpt.pt")
    assert ckpt["step"] == (14 if joint else 16) and ckpt["sharp"]["steps_done"] == 4  # its gradients averaged by hand
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["sharp"], ckpt["rng"][1]["sharp"])
    assert not (ROOT / ".hydra").exists()


@pytest.mark.parametrize("args, message", [
    (["paths.data_dir=/nonexistent"], "run `make data` first"),
    (["obs_std=0"], "obs_std=0.0 must be > 0"),
    (["obs_std=-1"], "obs_std=-1.0 must be > 0"),
    (["obs_std=abc"], "obs_std='abc' is not a number"),
    (["device=tpu"], "device='tpu' is not a device"),
    (["train.batch_size=0"], "train.batch_size=0 is out of range: it must be >= 1"),
    (["train.max_steps=0"], "train.max_steps=0 is out of range: it must be >= 1"),
    (["train.lr=fast"], "train.lr='fast' is not a number"),
    (["likelihood=poisson"], "likelihood='poisson': use one of gaussian, bernoulli"),
    (["model.width=-3"], "model.width=-3 is out of range"),
])
def test_bad_input_fails_fast_with_one_line_and_no_run_folder(tiny_data, tmp_path, args, message):
    proc = run_module("pipeline.train", *train_args(tiny_data, tmp_path), *args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip().removeprefix('error: ')}"]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "train").exists()  # no empty run folder left behind


@pytest.mark.slow
def test_a_bad_value_is_one_line_from_a_process_of_its_own(tiny_data, tmp_path):
    """The contract above seen from outside: exit status 2, that one line alone on stderr, no run folder."""
    proc = run_process("pipeline.train", *train_args(tiny_data, tmp_path), "train.batch_size=0", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"]
    assert "train.batch_size=0 is out of range" in proc.stderr and not (tmp_path / "train").exists()


@pytest.mark.parametrize("content", ["object", "truncated", "garbage"])
def test_unreadable_packed_arrays_are_one_line_errors(tmp_path, content):
    np.save(tmp_path / "test.npy", np.zeros((4, 3, 64, 64), np.uint8))
    if content == "object":
        np.save(tmp_path / "train.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif content == "truncated":
        np.save(tmp_path / "train.npy", np.zeros((100, 3, 64, 64), np.uint8))
        data = (tmp_path / "train.npy").read_bytes()
        (tmp_path / "train.npy").write_bytes(data[: len(data) // 2])
    else:
        (tmp_path / "train.npy").write_bytes(b"not an array at all" * 10)
    proc = run_module("pipeline.train", *train_args(tmp_path, tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'train.npy'} is not a readable .npy array" in proc.stderr


def test_wrong_shape_and_empty_datasets_are_rejected(tmp_path):
    np.save(tmp_path / "train.npy", np.zeros((10, 64, 64, 3), np.uint8))
    np.save(tmp_path / "test.npy", np.zeros((0, 3, 64, 64), np.uint8))
    proc = run_module("pipeline.train", *train_args(tmp_path, tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "expected uint8 N x 3 x H x H" in proc.stderr
    np.save(tmp_path / "train.npy", np.zeros((10, 3, 64, 64), np.uint8))
    proc = run_module("pipeline.train", *train_args(tmp_path, tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "is empty" in proc.stderr


def test_a_non_finite_loss_stops_the_run_naming_the_step(tiny_data, tmp_path):
    proc = run_module("pipeline.train", *train_args(tiny_data, tmp_path, "obs_std=1e-30", "train.max_steps=20"),
                      check=False)
    assert proc.returncode == 2
    assert "non-finite at step 0" in proc.stderr


def test_kl_warmup_weighs_the_kl_term_up_to_the_elbo_and_only_the_loss(tiny_data, tmp_path):
    assert [kl_weight(s, 100) for s in (0, 49, 99, 100, 5000)] == [0.01, 0.5, 1.0, 1.0, 1.0]
    assert kl_weight(0, 0) == 1.0
    run_module("pipeline.train", *train_args(tiny_data, tmp_path, "train.max_steps=10", "train.kl_warmup_steps=1000"))
    rows = list(csv.DictReader(open(only_run(tmp_path) / "metrics.csv")))
    for row in rows:  # weights 0.001-0.01 over the first 10 steps: the loss is nearly the nll alone
        loss, nll, kl = float(row["loss"]), float(row["nll"]), float(row["kl"])
        assert nll < loss < nll + 0.011 * kl, row


def test_the_preset_is_chosen_from_the_device_unless_given(tiny_data, tmp_path):
    auto = run_module("pipeline.train", *train_args(tiny_data, tmp_path / "auto", "train.max_steps=2"))
    assert "preset: cpu (chosen from the device)" in auto.stdout
    assert OmegaConf.load(only_run(tmp_path / "auto") / "config.yaml").preset_name == "cpu"
    asked = run_module("pipeline.train", "preset=gpu", *train_args(tiny_data, tmp_path / "gpu", "train.max_steps=2"))
    assert "preset: gpu" in asked.stdout and "chosen from the device" not in asked.stdout
    config = OmegaConf.load(only_run(tmp_path / "gpu") / "config.yaml")
    assert config.preset_name == "gpu"
    assert config.train.epochs == OmegaConf.load(ROOT / "conf/preset/gpu.yaml").train.epochs  # the preset's schedule
    assert config.model.width == 16 and config.train.batch_size == 32  # the command line still wins


@pytest.mark.slow
def test_runs_started_at_once_get_their_own_folders(tiny_data, tmp_path):
    procs = [start_training(train_args(tiny_data, tmp_path, "train.max_steps=3", f"seed={k}")) for k in range(3)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stdout.read()[-2000:]
    runs = sorted(p.parent for p in tmp_path.rglob("ckpt.pt"))
    assert len(runs) == 3
    for run in runs:
        rows = list(csv.reader(open(run / "metrics.csv")))
        assert rows[0][0] == "step" and all(r[0] != "step" for r in rows[1:])
        assert load_checkpoint(run / "ckpt.pt")["config"]["seed"] == OmegaConf.load(run / "config.yaml").seed
    assert sorted(load_checkpoint(r / "ckpt.pt")["config"]["seed"] for r in runs) == [0, 1, 2]


def test_resume_continues_the_run_as_configured_and_refuses_changes_of_meaning(tiny_data, tmp_path):
    run_module("pipeline.train", *train_args(tiny_data, tmp_path, "train.max_steps=6", "train.ckpt_every=2"))
    run = only_run(tmp_path)
    config = (run / "config.yaml").read_text()
    for change in ["obs_std=0.3", "model.width=8", "likelihood=bernoulli", f"paths.data_dir={tmp_path}"]:
        proc = run_module("pipeline.train", f"resume={run}", change, check=False)
        assert proc.returncode == 2 and "would change what the run" in proc.stderr, (change, proc.stderr)
    assert (run / "config.yaml").read_text() == config
    # the hint printed on stop: resume=<folder> alone continues with the run's own keys (max_steps=6 here)
    run_module("pipeline.train", f"resume={run}", f"paths.output_dir={tmp_path}")
    assert load_checkpoint(run / "ckpt.pt")["step"] == 6
    run_module("pipeline.train", f"resume={run}", "train.max_steps=10")
    assert load_checkpoint(run / "ckpt.pt")["step"] == 10
    assert OmegaConf.load(run / "config.yaml").train.max_steps == 10
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert resumes[-1]["changed"] == {"train.max_steps": [6, 10]} and resumes[-1]["step"] == 6
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv"))]
    assert steps == sorted(set(steps))
    assert only_run(tmp_path) == run and len([p for p in run.parent.iterdir()]) == 1  # no folder per resume
