"""The sharp decoder: its discriminator and augmentations, and its phase inside `make train` (the VAE it
follows is left exactly as it was, and the phase resumes exactly)."""
import csv

import numpy as np
import pytest
import torch

from pipeline.adversarial import (PatchDiscriminator, adaptive_weight, cutout, decoder_state, diff_augment,
                                  discriminator_loss, generator_loss, last_layer, pooled, r1_penalty, translate,
                                  wider_copy, with_decoder)
from pipeline.api import load
from pipeline.model import VAE
from pipeline.runs import load_checkpoint
from tests.helpers import run_module, train_args


def only_run(out_dir):
    runs = [p.parent for p in out_dir.rglob("ckpt.pt")]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.parametrize("layers, patches, norm", [(2, 14, "batch"), (3, 6, "batch"), (3, 6, "none")])
def test_the_discriminator_gives_one_logit_per_patch(layers, patches, norm):
    disc = PatchDiscriminator(width=8, layers=layers, norm=norm)
    logits = disc(torch.rand(2, 3, 64, 64))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules()) == (norm == "batch")
    assert logits.shape == (2, 1, patches, patches)


def test_translation_shifts_the_picture_and_pads_with_zeros():
    torch.manual_seed(0)
    x = torch.arange(64.0).reshape(1, 1, 8, 8).repeat(64, 3, 1, 1) + 1
    moved = translate(x, 0.25)
    assert moved.shape == x.shape
    for image in moved:  # each is its original shifted by up to 2 px, the rest zero
        kept = image[0][image[0] > 0]
        assert len(kept) >= 36 and torch.all(torch.diff(kept.reshape(-1)) != 0)
    assert any(not torch.equal(m, x[0]) for m in moved) and any(torch.equal(m, x[0]) for m in moved)


def test_cutout_zeroes_one_square_of_half_the_side_at_most():
    torch.manual_seed(0)
    masked = cutout(torch.ones(50, 3, 16, 16), 0.5)
    zeros = (masked[:, 0] == 0).flatten(1).sum(1)
    assert zeros.max() == 64 and zeros.min() > 0  # 8 x 8 inside the picture, fewer where it leaves the edge
    assert torch.equal(masked[:, 0], masked[:, 2])


def test_diffaugment_is_differentiable_and_random_per_image():
    x = torch.rand(4, 3, 64, 64, requires_grad=True)
    out = diff_augment(x)
    out.sum().backward()
    assert out.shape == x.shape and x.grad is not None and x.grad.abs().sum() > 0
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("kind", ["hinge", "nonsaturating"])
def test_losses_prefer_real_high_and_fake_low(kind):
    high, low = torch.full((4, 1, 6, 6), 3.0), torch.full((4, 1, 6, 6), -3.0)
    assert discriminator_loss(high, low, kind) < discriminator_loss(low, high, kind)
    assert generator_loss(high, kind) < generator_loss(low, kind)


def test_the_adaptive_weight_balances_the_two_gradients_at_the_last_layer():
    model = VAE(width=8, depth=4, latent_dim=8, decoder_width=8)
    out = torch.sigmoid(model.decode(torch.randn(2, 8)))
    rec, adv = out.mean(), 1000 * out.mean()  # the same direction, 1000x the scale
    weight = adaptive_weight(rec, adv, last_layer(model))
    assert torch.isclose(weight, torch.tensor(1e-3), rtol=1e-2)


def test_a_sharp_decoder_keeps_the_encoder_and_refuses_other_shapes():
    model = VAE(width=8, depth=4, latent_dim=8, decoder_width=8)
    other = VAE(width=8, depth=4, latent_dim=8, decoder_width=16)
    state = {k: v + 1 for k, v in decoder_state(model).items()}
    sharp = with_decoder(model, state)
    assert torch.equal(sharp.encoder[0][0].weight, model.encoder[0][0].weight)
    assert torch.equal(sharp.project.weight, model.project.weight + 1)
    with pytest.raises((ValueError, RuntimeError)):
        with_decoder(model, decoder_state(other))
    with pytest.raises(ValueError, match="missing"):
        with_decoder(model, {})


def test_the_r1_penalty_is_the_squared_gradient_norm_at_real_faces():
    weights = torch.randn(3, 8, 8)
    real = torch.rand(5, 3, 8, 8, requires_grad=True)
    logits = (real * weights).flatten(1).sum(1) + (real ** 2).sum() * 0  # gradient = weights at every face
    assert torch.isclose(r1_penalty(logits, real), weights.pow(2).sum(), rtol=1e-5)


def test_the_coarse_reconstruction_term_compares_block_means():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(pooled(x, 1), x)
    assert torch.allclose(pooled(x, 4)[:, :, 1, 0], x[:, :, 4:, :4].mean((2, 3)))


def test_a_wider_sharp_decoder_starts_as_the_elbo_decoder():
    torch.manual_seed(0)
    model = VAE(width=8, depth=4, latent_dim=8, decoder_width=8).eval()
    wide = wider_copy(model, 16).eval()
    z = torch.randn(4, 8)
    assert wide.decoder[-1].weight.shape[0] == 16 and wide.project.weight.shape[0] == 2 * model.project.weight.shape[0]
    assert torch.allclose(wide.decode(z), model.decode(z), atol=1e-6)
    assert torch.equal(wide.encoder[0][0].weight, model.encoder[0][0].weight)
    again = with_decoder(model, decoder_state(wide), decoder_width=16)  # as a checkpoint reloads it
    assert torch.equal(again.decode(z), wide.decode(z))
    with pytest.raises(ValueError, match="narrower than the ELBO decoder"):
        wider_copy(model, 4)


def test_the_sharp_phase_leaves_the_vae_exactly_as_it_was(tiny_data, tmp_path):
    common = ["train.max_steps=12", "train.num_threads=2"]
    run_module("pipeline.train", *train_args(tiny_data, tmp_path / "vae", *common))
    proc = run_module("pipeline.train", *train_args(tiny_data, tmp_path / "both", *common, sharp_steps=12))
    assert "12 VAE steps then 12 sharp-decoder steps" in proc.stdout
    vae, both = (load_checkpoint(only_run(tmp_path / k) / "ckpt.pt") for k in ("vae", "both"))
    assert both["step"] == 24 and both["vae_steps"] == 12 and both["encoder_step"] == 12 and "sharp" not in vae
    for name, value in vae["model"].items():  # encoder, ELBO decoder, BatchNorm statistics: untouched
        assert torch.equal(value, both["model"][name]), name
    changed = [k for k, v in both["sharp"]["decoder"].items() if not torch.equal(v, both["model"][k])]
    assert changed and all(k.startswith(("project.", "decoder.")) for k in both["sharp"]["decoder"])
    run = only_run(tmp_path / "both")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["step"] for r in rows if r["test_elbo"]] == ["12"]  # the ELBO is the VAE's, reported once
    assert all(float(r["sharp_rec_l1"]) > 0 for r in rows if int(r["step"]) > 12)
    assert torch.load(run / "prior.pt", weights_only=True)["step"] == 12  # fitted on the encoder's codes
    assert (run / "sharp_samples_epoch001.png").exists() or list(run.glob("sharp_samples_epoch*.png"))


@pytest.mark.slow
def test_trained_beside_the_vae_the_sharp_decoder_leaves_it_exactly_as_it_was(tiny_data, tmp_path):
    common = ["train.max_steps=20", "train.num_threads=2"]
    run_module("pipeline.train", *train_args(tiny_data, tmp_path / "vae", *common))
    proc = run_module("pipeline.train", *train_args(tiny_data, tmp_path / "joint", *common, "sharp.joint_from=12",
                                                    sharp_steps=12))
    assert "20 VAE steps, 12 sharp-decoder steps beside them from step 12" in proc.stdout
    vae, joint = (load_checkpoint(only_run(tmp_path / k) / "ckpt.pt") for k in ("vae", "joint"))
    assert joint["step"] == 24 and joint["encoder_step"] == 20 and joint["sharp"]["steps_done"] == 12
    for name, value in vae["model"].items():  # its own noise: the VAE's flips and draws are not consumed
        assert torch.equal(value, joint["model"][name]), name
    changed = [k for k, v in joint["sharp"]["decoder"].items() if not torch.equal(v, joint["model"][k])]
    assert changed
    rows = {int(r["step"]): r for r in csv.DictReader(open(only_run(tmp_path / "joint") / "metrics.csv"))}
    assert 12 in rows and not rows[12]["sharp_rec_l1"] and float(rows[12]["kl"]) > 0  # a row ends where it starts
    assert float(rows[15]["kl"]) > 0 and float(rows[15]["sharp_rec_l1"]) > 0  # both train on the same batches
    assert not rows[24]["kl"] and float(rows[24]["sharp_rec_l1"]) > 0
    alone = {r["step"]: r["test_elbo"] for r in csv.DictReader(open(only_run(tmp_path / "vae") / "metrics.csv"))}
    assert {str(s): r["test_elbo"] for s, r in rows.items() if r["test_elbo"]} == \
        {s: elbo for s, elbo in alone.items() if elbo} and alone["20"]  # the same ELBOs, the last at the VAE's end


@pytest.mark.parametrize("average", ["sharp.ema=0", pytest.param("sharp.ema=0.9", marks=pytest.mark.slow)])
def test_a_resumed_sharp_phase_gives_the_same_weights_as_an_uninterrupted_one(tiny_data, tmp_path, average):
    common = ["train.max_steps=10", "train.ckpt_every=5", "train.num_threads=2", average]
    run_module("pipeline.train", *train_args(tiny_data, tmp_path / "straight", *common, sharp_steps=16))
    run_module("pipeline.train", *train_args(tiny_data, tmp_path / "stopped", *common, sharp_steps=7))
    stopped = only_run(tmp_path / "stopped")
    assert "sharp" in load_checkpoint(stopped / "ckpt.pt")
    proc = run_module("pipeline.train", *train_args(tiny_data, tmp_path / "stopped", *common,
                                                     f"resume={stopped}", sharp_steps=16))
    assert "resuming" in proc.stdout
    straight, resumed = (load_checkpoint(d / "ckpt.pt") for d in (only_run(tmp_path / "straight"), stopped))
    assert resumed["step"] == straight["step"] == 26
    assert ("trained" in resumed["sharp"]) == (average == "sharp.ema=0.9")  # the average samples, "trained" trains
    for part in ("decoder", "disc", *(["trained"] if "trained" in resumed["sharp"] else [])):
        for name, value in straight["sharp"][part].items():
            assert torch.allclose(value.float(), resumed["sharp"][part][name].float(), rtol=1e-5, atol=1e-6), name
    # once the phase has begun its settings are part of what the run means
    refused = run_module("pipeline.train", *train_args(tiny_data, tmp_path / "stopped", *common,
                                                        f"resume={stopped}", "sharp.adv_weight=2", sharp_steps=20),
                         check=False)
    assert refused.returncode == 2 and "sharp.adv_weight=2" in refused.stderr


@pytest.mark.slow
def test_a_wider_sharp_decoder_with_r1_and_a_coarse_l1_trains_samples_and_exports(tiny_data, tmp_path):
    run_module("pipeline.train", *train_args(tiny_data, tmp_path, "train.max_steps=6", "sharp.decoder_width=32",
                                             "sharp.r1=1", "sharp.adv_weight=0.5", "sharp.rec_pool=4",
                                             sharp_steps=6))
    run = only_run(tmp_path)
    ckpt = load_checkpoint(run / "ckpt.pt")
    assert ckpt["sharp"]["decoder_width"] == 32 and ckpt["sharp"]["decoder"]["decoder.1.weight"].shape[0] == 256
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r["sharp_disc"]]
    assert rows and all(torch.isfinite(torch.tensor(float(r["sharp_disc"]))) for r in rows)
    proc = run_module("pipeline.sample", f"paths.output_dir={tmp_path}", f"ckpt={run}", "n=4", "nrow=2")
    assert list(tmp_path.rglob("samples_*_sharp*.png")), proc.stdout[-2000:]
    # an export carries the wider decoder, and reads back as the run does
    run_module("pipeline.export", f"paths.output_dir={tmp_path}", f"ckpt={run}", f"out={tmp_path}/export",
               "cascade=false")
    from_run, from_export = load(run, device="cpu"), load(tmp_path / "export", device="cpu")
    assert np.array_equal(from_run.sample(4, seed=1), from_export.sample(4, seed=1))


def test_the_reconstruction_term_alone_builds_no_discriminator_and_resumes(tiny_data, tmp_path):
    common = ["train.max_steps=4", "sharp.adv_weight=0"]
    run_module("pipeline.train", *train_args(tiny_data, tmp_path, *common, sharp_steps=3))
    run = only_run(tmp_path)
    assert not {"disc", "opt_d"} & set(load_checkpoint(run / "ckpt.pt")["sharp"])
    run_module("pipeline.train", *train_args(tiny_data, tmp_path, *common, f"resume={run}", sharp_steps=5))
    assert load_checkpoint(run / "ckpt.pt")["sharp"]["steps_done"] == 5


def test_a_finished_vae_run_gets_a_sharp_decoder_by_resuming_it(tiny_data, tmp_path):
    run_module("pipeline.train", *train_args(tiny_data, tmp_path, "train.max_steps=8"))
    run = only_run(tmp_path)
    late = run_module("pipeline.train", *train_args(tiny_data, tmp_path, "train.max_steps=8", f"resume={run}",
                                                    "sharp.joint_from=4", sharp_steps=4), check=False)
    assert late.returncode == 2 and "sharp.joint_from=4 is before step 8" in late.stderr, late.stderr[-2000:]
    run_module("pipeline.train", *train_args(tiny_data, tmp_path, "train.max_steps=8", f"resume={run}",
                                             "sharp.loss=nonsaturating", "sharp.diffaugment=false", sharp_steps=4))
    ckpt = load_checkpoint(run / "ckpt.pt")
    assert ckpt["step"] == 12 and ckpt["sharp"]["steps_done"] == 4
    assert "sharp.loss" in (run / "resumes.jsonl").read_text()


@pytest.mark.parametrize("args, message", [
    (["sharp.loss=wasserstein"], "sharp.loss='wasserstein'"),
    (["sharp.disc_layers=9"], "sharp.disc_layers=9 is out of range"),
    (["sharp.adv_weight=-1"], "sharp.adv_weight=-1"),
    (["sharp.decoder_width=8"], "sharp.decoder_width=8 is narrower than the ELBO decoder (16)"),
    (["sharp.r1=-1"], "sharp.r1=-1"),
    (["sharp.rec_pool=0"], "sharp.rec_pool=0"),
    (["train.max_steps=8", "sharp.joint_from=8"], "sharp.joint_from=8 is not before the VAE's last step (8)"),
    (["sharp.joint_from=-1"], "sharp.joint_from=-1"),
])
def test_bad_sharp_settings_are_one_line(tiny_data, tmp_path, args, message):
    proc = run_module("pipeline.train", *train_args(tiny_data, tmp_path, *args), check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("ckpt.pt"))
