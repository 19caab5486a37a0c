import math

import pytest
import torch

from pipeline.model import VAE, bernoulli_nll, bits_per_dim, gaussian_nll, kl_to_standard_normal, negative_elbo


def test_gaussian_nll_matches_hand_computation():
    x = torch.tensor([[[[0.2, 0.8]]]])  # one image, D = 2
    out = torch.logit(torch.tensor([[[[0.5, 0.5]]]]))
    sigma = 0.1
    expected = (0.3 ** 2 + 0.3 ** 2) / (2 * sigma ** 2) + 2 * math.log(sigma) + math.log(2 * math.pi)
    assert gaussian_nll(x, out, sigma).item() == pytest.approx(expected, rel=1e-5)
    # the same thing through torch's own Normal distribution
    normal = torch.distributions.Normal(torch.sigmoid(out), sigma)
    assert gaussian_nll(x, out, sigma).item() == pytest.approx(-normal.log_prob(x).sum().item(), rel=1e-5)


def test_obs_std_scales_the_reconstruction_weight_as_one_over_its_square():
    x, out = torch.rand(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    d = x[0].numel()

    def weighted_error(sigma):
        return gaussian_nll(x, out, sigma) - d * math.log(sigma) - 0.5 * d * math.log(2 * math.pi)

    assert torch.allclose(weighted_error(0.05) / weighted_error(0.1), torch.full((4,), 4.0))
    assert torch.allclose(weighted_error(1.0) * 2 * 1.0, (x - torch.sigmoid(out)).pow(2).flatten(1).sum(1))


def test_kl_matches_hand_computation_and_is_zero_at_the_prior():
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    expected = 0.5 * (1.0 + 0) + 0.5 * (4.0 - 1 - math.log(4.0))
    assert kl_to_standard_normal(mu, logvar).item() == pytest.approx(expected)
    assert kl_to_standard_normal(torch.zeros(3, 5), torch.zeros(3, 5)).abs().max() == 0


def test_bernoulli_works_on_unit_interval_data():
    x = torch.tensor([[[[0.0, 1.0, 0.25]]]])
    out = torch.tensor([[[[0.0, 2.0, -1.0]]]])
    p = torch.sigmoid(out)
    expected = -(x * p.log() + (1 - x) * (1 - p).log()).sum()
    assert bernoulli_nll(x, out).item() == pytest.approx(expected.item(), rel=1e-6)
    loss, nll, kl = negative_elbo(x, out, torch.zeros(1, 2), torch.zeros(1, 2), "bernoulli")
    assert loss.item() == pytest.approx(nll.item()) and kl.item() == 0
    with pytest.raises(ValueError, match="likelihood"):
        negative_elbo(x, out, torch.zeros(1, 2), torch.zeros(1, 2), "poisson")


def test_beta_weights_only_the_kl_term():
    x, out = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mu, logvar = torch.randn(2, 6), torch.randn(2, 6)
    loss1, nll, kl = negative_elbo(x, out, mu, logvar, beta=1.0)
    loss2, _, _ = negative_elbo(x, out, mu, logvar, beta=0.5)
    assert loss1.item() == pytest.approx((nll + kl).item()) and loss2.item() == pytest.approx((nll + 0.5 * kl).item())


def test_bits_per_dim_of_a_uniform_model_is_eight():
    assert bits_per_dim(0.0, 100) == pytest.approx(8.0)


def test_decoder_means_live_in_the_data_range_and_logvar_is_clamped():
    model = VAE(image_size=32, width=8, depth=3, latent_dim=4)
    out, mu, logvar = model(torch.rand(2, 3, 32, 32) * 1e6)
    assert out.shape == (2, 3, 32, 32) and mu.shape == (2, 4)
    assert torch.sigmoid(out).min() >= 0 and torch.sigmoid(out).max() <= 1
    assert logvar.max() <= 20 and logvar.min() >= -30
    with pytest.raises(ValueError, match="divisible"):
        VAE(image_size=60, depth=4)


@pytest.mark.parametrize("upsample", ["transposed", "nearest"])
def test_both_decoder_upsamplings_give_full_size_images_and_learn(upsample):
    torch.manual_seed(0)
    model = VAE(image_size=32, width=8, depth=3, latent_dim=4, res_blocks=1, upsample=upsample)
    x = torch.rand(4, 3, 32, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = negative_elbo(x, *model(x))[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model.decode(torch.zeros(1, 4)).shape == (1, 3, 32, 32)
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="model.upsample='bilinear'"):
        VAE(image_size=32, width=8, depth=3, latent_dim=4, upsample="bilinear")


def test_bf16_is_used_on_cuda_and_on_cpus_with_native_bf16_by_default(monkeypatch):
    from pipeline import train
    from pipeline.train import TrainError, use_bf16
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    assert use_bf16("auto", "cuda") and not use_bf16("auto", "cpu") and not use_bf16("auto", "mps")
    assert use_bf16("true", "cpu") and use_bf16("True", "cuda") and not use_bf16("false", "cuda")
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    assert use_bf16("auto", "cpu") and not use_bf16("false", "cpu") and not use_bf16("auto", "mps")
    with pytest.raises(TrainError, match="train.amp='maybe'"):
        use_bf16("maybe", "cpu")
