"""The convolutional VAE and its objective, written as the likelihood it is.

Gaussian observation model: p(x|z) = N(x; decoder(z), obs_std^2 I) on pixels in [0, 1], so the
reconstruction term is sum (x - mean)^2 / (2 obs_std^2) + D log obs_std + D/2 log 2 pi per image.
obs_std is the one knob that balances reconstruction against the KL term; there is no hidden weight.
"""
import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import key
from pipeline.images import interleave_rows, to_float

LOGVAR_RANGE = (-30.0, 20.0)


@dataclass
class ModelConfig:
    """The keys of conf/model/default.yaml, their types and ranges."""
    width: int = key(low=1)
    depth: int = key(low=1, high=8)
    latent_dim: int = key(low=1)
    max_channels: int = key(low=1)
    decoder_width: int | None = key(low=1)
    res_blocks: int = key(low=0)
    upsample: str = key(choices=("transposed", "nearest"))


def down_block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


def upsample_conv(c_in, c_out, upsample, bias=False):
    """x2 in height and width: a 4x4 stride-2 transposed conv, or nearest-neighbour repeat + 3x3 conv (no
    checkerboard pattern by construction, 2.25x the multiply-adds at the same channels)."""
    if upsample == "transposed":
        return nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=bias)
    if upsample == "nearest":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=bias))
    raise ValueError(f"model.upsample={upsample!r}: use transposed or nearest")


def up_block(c_in, c_out, res_blocks=0, upsample="transposed"):
    return nn.Sequential(upsample_conv(c_in, c_out, upsample), nn.BatchNorm2d(c_out), nn.SiLU(),
                         *[ResBlock(c_out) for _ in range(res_blocks)])


class ResBlock(nn.Module):
    """x + two 3x3 convs: more decoder depth at one resolution (each costs about one down/up level)."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
                                  nn.SiLU(), nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels))

    def forward(self, x):
        return F.silu(x + self.body(x))


class VAE(nn.Module):
    """DCGAN-style: `depth` stride-2 4x4 convs (width, 2*width, ...) down, transposed convs back up
    (or nearest-neighbour upsampling + 3x3 convs: `upsample`).

    The decoder may be wider than the encoder (decoder_width) and may add `res_blocks` residual
    blocks after each of its upsampling levels.
    """

    def __init__(self, image_size=64, width=32, depth=4, latent_dim=128, max_channels=512,
                 decoder_width=None, res_blocks=0, upsample="transposed"):
        super().__init__()
        self.settings = {"image_size": image_size, "width": width, "depth": depth, "latent_dim": latent_dim,
                         "max_channels": max_channels, "decoder_width": decoder_width, "res_blocks": res_blocks,
                         "upsample": upsample}
        if image_size % 2 ** depth:
            raise ValueError(f"image_size={image_size} must be divisible by 2**depth={2 ** depth}")
        self.image_size, self.latent_dim = image_size, latent_dim
        self.bottom = image_size // 2 ** depth
        channels = [min(width * 2 ** i, max_channels) for i in range(depth)]
        self.encoder = nn.Sequential(*[down_block(c_in, c_out) for c_in, c_out in zip([3] + channels, channels)],
                                     nn.Flatten(), nn.Linear(channels[-1] * self.bottom ** 2, 2 * latent_dim))
        ups = [min((decoder_width or width) * 2 ** i, max_channels) for i in range(depth)][::-1]
        self.project = nn.Linear(latent_dim, ups[0] * self.bottom ** 2)
        self.decoder = nn.Sequential(
            nn.Unflatten(1, (ups[0], self.bottom, self.bottom)), nn.BatchNorm2d(ups[0]), nn.SiLU(),
            *[up_block(c_in, c_out, res_blocks, upsample) for c_in, c_out in zip(ups, ups[1:])],
            upsample_conv(ups[-1], 3, upsample, bias=True))

    def encode(self, x):
        mu, logvar = self.encoder(x * 2 - 1).float().chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z):
        """Decoder output before the link function: pixel means are sigmoid(decode(z)) in [0, 1]."""
        return self.decoder(self.project(z)).float()

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def model_settings(model_args: dict) -> dict:
    """VAE keyword arguments with every default filled in (older checkpoints lack newer keys)."""
    params = inspect.signature(VAE.__init__).parameters.values()
    return {**{p.name: p.default for p in params if p.default is not p.empty}, **model_args}


def gaussian_nll(x, out, obs_std):
    """-log N(x; sigmoid(out), obs_std^2 I), summed over pixels: one value per image."""
    mean = torch.sigmoid(out)
    d = x[0].numel()
    sq = (x - mean).pow(2).flatten(1).sum(1)
    return sq / (2 * obs_std ** 2) + d * math.log(obs_std) + 0.5 * d * math.log(2 * math.pi)


def bernoulli_nll(x, out):
    """-log Bernoulli(x; sigmoid(out)) summed over pixels (x in [0, 1], continuous values allowed)."""
    return F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)


def kl_to_standard_normal(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dimensions: one value per image."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)


def negative_elbo(x, out, mu, logvar, likelihood="gaussian", obs_std=0.1, beta=1.0):
    """Batch means of (loss, nll, kl); loss = nll + beta * kl, and -ELBO = nll + kl."""
    if likelihood == "gaussian":
        nll = gaussian_nll(x, out, obs_std)
    elif likelihood == "bernoulli":
        nll = bernoulli_nll(x, out)
    else:
        raise ValueError(f"likelihood={likelihood!r}: use gaussian or bernoulli")
    kl = kl_to_standard_normal(mu, logvar)
    return (nll + beta * kl).mean(), nll.mean(), kl.mean()


def bits_per_dim(neg_elbo_nats: float, dims: int) -> float:
    """-ELBO of 8-bit images scaled to [0, 1], in bits per dimension of the discrete data."""
    return (neg_elbo_nats + dims * math.log(256)) / (dims * math.log(2))


@contextmanager
def evaluating(model: nn.Module):
    """The model in eval mode (BatchNorm uses its running statistics) and without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_means(model: VAE, images_uint8, batch_size: int = 500) -> torch.Tensor:
    """Encoder means (N x latent_dim, on the CPU) of uint8 images, in batches on the model's device."""
    device, out = model_device(model), []
    with evaluating(model):
        for start in range(0, len(images_uint8), batch_size):
            x = to_float(images_uint8[start:start + batch_size]).to(device)
            out.append(model.encode(x)[0].cpu())
    return torch.cat(out)


def decode_means(model: VAE, z: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Pixel means in [0, 1] (on the CPU) of latent codes, in batches on the model's device."""
    device, out = model_device(model), []
    with evaluating(model):
        for start in range(0, len(z), batch_size):
            out.append(torch.sigmoid(model.decode(z[start:start + batch_size].to(device))).cpu())
    return torch.cat(out)


def recon_grid(model: VAE, faces_uint8, nrow: int) -> torch.Tensor:
    """Rows of faces, each followed by the row of their reconstructions (decoder means of mu)."""
    return interleave_rows(to_float(faces_uint8).cpu(), decode_means(model, encode_means(model, faces_uint8)), nrow)


def evaluate_elbo(model: VAE, data_uint8: torch.Tensor, likelihood: str, obs_std: float,
                  batch_size: int = 500) -> dict:
    """Test -ELBO per image (one posterior sample, fixed noise) and in bits per dimension."""
    generator = torch.Generator(device=data_uint8.device).manual_seed(1234)
    totals = torch.zeros(3, dtype=torch.float64, device=data_uint8.device)
    with evaluating(model):
        for start in range(0, len(data_uint8), batch_size):
            x = to_float(data_uint8[start:start + batch_size])
            mu, logvar = model.encode(x)
            z = mu + torch.randn(mu.shape, generator=generator, device=mu.device) * torch.exp(0.5 * logvar)
            _, nll, kl = negative_elbo(x, model.decode(z), mu, logvar, likelihood, obs_std)
            totals += torch.stack([nll + kl, nll, kl]).double() * len(x)
    neg_elbo, nll, kl = (totals / len(data_uint8)).tolist()
    return {"test_elbo": -neg_elbo, "test_nll": nll, "test_kl": kl,
            "test_bpd": bits_per_dim(neg_elbo, data_uint8[0].numel())}
