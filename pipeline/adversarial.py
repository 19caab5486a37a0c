"""The sharp decoder's training: a patch discriminator, its losses and DiffAugment, and the phase that
trains a copy of the ELBO decoder after the VAE has trained (or beside it, from sharp.joint_from).

A Gaussian decoder trained on the ELBO predicts the mean of every face a code could be, so it is blurry
by design. The sharp decoder starts as a copy of it and learns, on the frozen encoder's codes (posterior
draws of the training faces), to reconstruct them (L1) while a PatchGAN discriminator tells its faces
from real ones, as the KL-regularised autoencoder of latent diffusion does: the adversarial term's
weight is set each step from the ratio of gradient norms at the decoder's last layer. DiffAugment
(colour, translation, cutout) on both of the discriminator's inputs keeps it from memorising 15k faces.
The encoder, the ELBO decoder, the stored prior and every reported ELBO stay exactly the VAE's: the phase
draws its noise from a generator of its own, so even trained beside the VAE it leaves the VAE's steps as they are.
"""
import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.config import key
from pipeline.model import VAE, evaluating, model_device

# the sharp decoder's state in a checkpoint: these VAE keys (the encoder is the ELBO model's)
DECODER_PREFIXES = ("project.", "decoder.")
# what one step returns, as metrics.csv names it
SHARP_FIELDS = ["sharp_rec_l1", "sharp_adv", "sharp_disc", "sharp_adv_weight"]


@dataclass
class SharpConfig:
    """The keys of conf/sharp/default.yaml, their types and ranges."""
    epochs: int = key(low=0)
    max_steps: int | None = key(low=0)
    lr: float = key(low=1e-12)
    disc_lr: float = key(low=1e-12)
    disc_width: int = key(low=1)
    disc_layers: int = key(low=1, high=4)
    adv_weight: float = key(low=0)
    adaptive: bool = key()
    warmup_steps: int = key(low=0)
    loss: str = key(choices=("hinge", "nonsaturating"))
    diffaugment: bool = key()
    codes: str = key(choices=("posterior", "mean"))
    ema: float = key(low=0, high=0.999999)
    disc_norm: str = key(choices=("batch", "none"))
    r1: float = key(low=0)
    rec_pool: int = key(low=1, high=64)
    decoder_width: int | None = key(low=1)
    joint_from: int | None = key(low=0)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix, latent diffusion's autoencoder): `layers` stride-2 4x4 convs, then two stride-1 ones;
    one real/fake logit per overlapping patch (receptive field 34 px with 2 layers, 70 px with 3)."""

    def __init__(self, width=32, layers=3, norm="batch"):
        super().__init__()
        blocks = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, layers + 1):
            out = width * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            normed = [nn.BatchNorm2d(out)] if norm == "batch" else []
            blocks += [nn.Conv2d(channels, out, 4, stride, 1, bias=not normed), *normed, nn.LeakyReLU(0.2)]
            channels = out
        blocks.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x):
        return self.net(x * 2 - 1).float()


def diff_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020), differentiable: random brightness, saturation and contrast, a
    translation by up to 1/8 of the side (zero padded) and a cutout of half the side, per image."""
    def uniform():
        return torch.rand(len(x), 1, 1, 1, device=x.device, generator=generator)
    x = x + (uniform() - 0.5)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (uniform() * 2) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (uniform() + 0.5) + mean
    return cutout(translate(x, 0.125, generator), 0.5, generator)


def translate(x: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    n, _, h, w = x.shape
    shift = int(h * ratio + 0.5)
    dy, dx = (torch.randint(-shift, shift + 1, (2, n, 1, 1), device=x.device, generator=generator))
    rows = (torch.arange(h, device=x.device)[None, :, None] + dy).clamp(-1, h)
    cols = (torch.arange(w, device=x.device)[None, None, :] + dx).clamp(-1, w)
    padded = F.pad(x, [1, 1, 1, 1])
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows + 1, cols + 1].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    n, _, h, w = x.shape
    size = int(h * ratio + 0.5)
    top = torch.randint(0, h + (1 - size % 2), (n, 1, 1), device=x.device, generator=generator) - size // 2
    left = torch.randint(0, w + (1 - size % 2), (n, 1, 1), device=x.device, generator=generator) - size // 2
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return x * (~inside)[:, None].to(x.dtype)


def discriminator_loss(real_logits, fake_logits, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits, kind: str) -> torch.Tensor:
    return -fake_logits.mean() if kind == "hinge" else F.softplus(-fake_logits).mean()


def pooled(x: torch.Tensor, size: int) -> torch.Tensor:
    """The means of size x size blocks: the reconstruction term at a coarser scale leaves finer detail to the
    discriminator (1: every pixel)."""
    return F.avg_pool2d(x, size) if size > 1 else x


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): the squared norm of the discriminator's gradient at real faces, per face."""
    grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def adaptive_weight(rec: torch.Tensor, adv: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||d rec / d W|| / ||d adv / d W|| at the decoder's last layer W (latent diffusion's autoencoder): the
    adversarial term pulls as hard as the reconstruction, whatever their scales."""
    rec_grad = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0, 1e4).detach()


def last_layer(model: VAE) -> torch.Tensor:
    return [p for p in model.decoder.parameters() if p.dim() == 4][-1]


def decoder_state(model: VAE) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.startswith(DECODER_PREFIXES)}


def with_decoder(model: VAE, state: dict, decoder_width: int | None = None) -> VAE:
    """A copy of `model` (its encoder) with the sharp decoder's weights (`decoder_width` channels at its last
    level when it was trained wider than the ELBO decoder)."""
    sharp = copy.deepcopy(model) if decoder_width is None else wider_copy(model, decoder_width)
    missing = set(decoder_state(sharp)) - set(state)
    unexpected = set(state) - set(decoder_state(sharp))
    if missing or unexpected:
        raise ValueError(f"the sharp decoder's tensors do not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    sharp.load_state_dict({**sharp.state_dict(), **state})
    return sharp


def decoder_width_problem(decoder_width: int | None, model_args) -> str | None:
    """Why sharp.decoder_width cannot be used with a model of `model_args`, or None when it can."""
    narrowest = model_args["decoder_width"] or model_args["width"]
    if decoder_width is not None and decoder_width < narrowest:
        return (f"sharp.decoder_width={decoder_width} is narrower than the ELBO decoder ({narrowest}): use null "
                f"(the same width) or at least {narrowest}")
    return None


def wider_copy(model: VAE, decoder_width: int) -> VAE:
    """A copy of `model` whose decoder has `decoder_width` channels at its last level (doubled towards the
    code) and, at first, computes exactly what `model`'s does (Net2WiderNet: the old weights in place, the
    new channels' incoming weights random, their outgoing ones zero)."""
    problem = decoder_width_problem(decoder_width, model.settings)
    if problem:
        raise ValueError(problem)
    wide = copy.deepcopy(model)
    wide.settings["decoder_width"] = decoder_width
    fresh = VAE(**wide.settings).to(model_device(model))
    wide.project, wide.decoder = fresh.project, fresh.decoder
    wide.train(model.training)
    for part in ("project", "decoder"):
        for new, old in zip(wide.get_submodule(part).modules(), model.get_submodule(part).modules()):
            grow_into(new, old)
    return wide


def grow_into(new: nn.Module, old: nn.Module) -> None:
    """Copy `old`'s tensors into the leading block of `new`'s; zero the weights from new input channels."""
    with torch.no_grad():
        for (_, big), (_, small) in zip(new.named_parameters(recurse=False), old.named_parameters(recurse=False)):
            region = tuple(slice(0, n) for n in small.shape)
            big[region] = small
            in_dim = 0 if isinstance(new, nn.ConvTranspose2d) else 1
            if big.dim() > 1 and big.shape[in_dim] > small.shape[in_dim]:
                from_new = [slice(0, n) for n in small.shape]
                from_new[in_dim] = slice(small.shape[in_dim], None)
                big[tuple(from_new)] = 0
        for (_, big), (_, small) in zip(new.named_buffers(recurse=False), old.named_buffers(recurse=False)):
            big[tuple(slice(0, n) for n in small.shape)] = small


class SharpPhase:
    """The sharp decoder (a copy of the VAE with its own decoder weights), the discriminator, their
    optimizers, and one training step of both. Gradients are averaged over ranks by hand (the two
    adversarial passes and the adaptive weight's autograd.grad do not fit DistributedDataParallel). Its noise
    (posterior draws, DiffAugment) comes from `generator`, one per rank, never from the VAE's random stream."""

    def __init__(self, cfg: SharpConfig, vae: VAE, seed: int, channels_last: bool, rank: int = 0):
        self.cfg = cfg
        self.vae = vae
        self.generator = torch.Generator(model_device(vae)).manual_seed(seed * 1_000_003 + 999_983 + rank)
        self.disc, self.opt_d = None, None  # none for the reconstruction term alone (sharp.adv_weight=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.decoder = (copy.deepcopy(vae) if cfg.decoder_width is None else
                            wider_copy(vae, cfg.decoder_width)).train()
            if cfg.adv_weight > 0:
                disc = PatchDiscriminator(cfg.disc_width, cfg.disc_layers, cfg.disc_norm).to(model_device(vae))
                self.disc = disc.to(memory_format=torch.channels_last) if channels_last else disc
                self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))
        params = [p for name, p in self.decoder.named_parameters() if name.startswith(DECODER_PREFIXES)]
        self.opt_g = torch.optim.Adam(params, lr=cfg.lr, betas=(0.5, 0.9))
        self.average = AveragedModel(self.decoder, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) \
            if cfg.ema else None
        self.steps_done = 0

    @property
    def sampler(self) -> VAE:
        """The sharp decoder that makes pictures: the moving average of its weights when sharp.ema > 0."""
        return self.average.module if self.average is not None else self.decoder

    def state_dict(self) -> dict:
        """"decoder" is what samples (the average, with sharp.ema); the trained weights are "trained" then."""
        averaged = {"trained": decoder_state(self.decoder), "ema_n": int(self.average.n_averaged)} \
            if self.average is not None else {}
        judged = {"disc": self.disc.state_dict(), "opt_d": self.opt_d.state_dict()} if self.disc is not None else {}
        return {"decoder": decoder_state(self.sampler), "decoder_width": self.cfg.decoder_width, **averaged,
                **judged, "opt_g": self.opt_g.state_dict(), "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        if self.average is not None:
            self.average.module.load_state_dict({**self.average.module.state_dict(), **state["decoder"]})
            self.average.n_averaged.fill_(state["ema_n"])
        trained = state["trained"] if self.average is not None else state["decoder"]
        self.decoder.load_state_dict({**self.decoder.state_dict(), **trained})
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.steps_done = state["steps_done"]

    @staticmethod
    def row(means: list[float]) -> dict:
        """A metrics.csv row's fields from the mean of `step`'s values since the last row."""
        return dict(zip(SHARP_FIELDS, means))

    @staticmethod
    def summary(means: list[float]) -> str:
        return "sharp decoder, train L1 {:.4f}, adversarial {:.3f}, discriminator {:.3f}".format(*means[:3])

    def augment(self, x):
        return diff_augment(x, self.generator) if self.cfg.diffaugment else x

    def step(self, x: torch.Tensor, autocast, world: int) -> torch.Tensor:
        """One step of the decoder, then of the discriminator: (reconstruction L1, generator loss,
        discriminator loss, adversarial weight), detached."""
        with evaluating(self.vae), autocast:  # beside the VAE (sharp.joint_from) it trains on after this
            mu, logvar = self.vae.encode(x)
        noise = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=self.generator)
        z = mu if self.cfg.codes == "mean" else mu + noise * torch.exp(0.5 * logvar)
        with autocast:
            fake = torch.sigmoid(self.decoder.decode(z))
        rec = (pooled(fake, self.cfg.rec_pool) - pooled(x, self.cfg.rec_pool)).abs().mean()
        adversarial = self.steps_done >= self.cfg.warmup_steps and self.cfg.adv_weight > 0
        g_loss, weight = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
        if adversarial:
            with autocast:
                g_loss = generator_loss(self.disc(self.augment(fake)), self.cfg.loss)
            weight = self.cfg.adv_weight * (adaptive_weight(rec, g_loss, last_layer(self.decoder))
                                            if self.cfg.adaptive else 1.0)
        self.opt_g.zero_grad(set_to_none=True)
        (rec + weight * g_loss).backward()
        average_gradients(self.opt_g, world)
        self.opt_g.step()
        if self.average is not None:
            self.average.update_parameters(self.decoder)
        d_loss = self.discriminator_step(x, fake.detach(), autocast, world) if adversarial else g_loss
        self.steps_done += 1
        return torch.stack([rec, g_loss, d_loss, torch.as_tensor(weight, device=x.device)]).detach().float()

    def discriminator_step(self, real, fake, autocast, world: int) -> torch.Tensor:
        real = real.detach().requires_grad_(self.cfg.r1 > 0)
        with autocast:
            real_logits = self.disc(self.augment(real))
            loss = discriminator_loss(real_logits, self.disc(self.augment(fake)), self.cfg.loss)
        penalty = r1_penalty(real_logits, real) * self.cfg.r1 / 2 if self.cfg.r1 > 0 else 0
        self.opt_d.zero_grad(set_to_none=True)
        (loss + penalty).backward()
        average_gradients(self.opt_d, world)
        self.opt_d.step()
        return loss


def average_gradients(optimizer: torch.optim.Optimizer, world: int) -> None:
    if world == 1:
        return
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def sharp_steps(cfg: SharpConfig, steps_per_epoch: int) -> int:
    """The phase's length: sharp.max_steps when set, else sharp.epochs of the training split."""
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch


@dataclass
class Phases:
    """Which steps train the VAE (those before vae_steps) and which the sharp decoder (sharp_start to sharp_end):
    after the VAE's (the fine-tune) or, from sharp.joint_from, beside them on the same batches (the joint design)."""
    vae_steps: int
    sharp_start: int
    sharp_end: int

    @classmethod
    def of(cls, cfg: SharpConfig, vae_steps: int, steps_per_epoch: int) -> "Phases":
        if cfg.joint_from is not None and cfg.joint_from >= vae_steps:
            raise ValueError(f"sharp.joint_from={cfg.joint_from} is not before the VAE's last step ({vae_steps}): "
                             "use a step below it, or null to train the sharp decoder after the VAE")
        start = vae_steps if cfg.joint_from is None else cfg.joint_from
        return cls(vae_steps, start, start + sharp_steps(cfg, steps_per_epoch))

    @property
    def total(self) -> int:
        return max(self.vae_steps, self.sharp_end)

    def trains_vae(self, step: int) -> bool:
        return step < self.vae_steps

    def trains_sharp(self, step: int) -> bool:
        return self.sharp_start <= step < self.sharp_end

    def __str__(self) -> str:
        sharp = self.sharp_end - self.sharp_start
        share = f"{100 * sharp / max(self.vae_steps + sharp, 1):.0f}% of the {self.vae_steps + sharp} steps"
        if not sharp:
            return f"{self.vae_steps} VAE steps (no sharp decoder: sharp.epochs=0)"
        if self.sharp_start == self.vae_steps:
            return f"{self.vae_steps} VAE steps then {sharp} sharp-decoder steps ({share})"
        return (f"{self.vae_steps} VAE steps, {sharp} sharp-decoder steps beside them from step {self.sharp_start} "
                f"(sharp.joint_from; {share} trained, {self.total} steps in all)")

