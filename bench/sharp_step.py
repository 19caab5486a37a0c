"""Images/s of the VAE's training step against the sharp decoder's, on the default model, side by side.

    .venv/bin/python bench/sharp_step.py [--threads 2] [--steps 20] [--widths 32 16 8]

One process, the same batch of 32 random faces, bf16 autocast where the CPU has native bf16 (as
`train.amp=auto`), 5 warm-up steps per side; then the sharp step at each discriminator width, and without
the adversarial term (the decoder's L1 step alone). Run it alone: on 2 cores anything beside it slows it ~8x.
"""
import argparse
import time

import torch
from omegaconf import OmegaConf

from pipeline.adversarial import SharpPhase
from pipeline.model import VAE, negative_elbo

ROOT_CONF = "conf/sharp/default.yaml"


def timed(step, steps: int, batch: int) -> float:
    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 16, 8])
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    bf16 = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    vae = VAE(image_size=64, width=16, depth=4, latent_dim=256, decoder_width=32).to(memory_format=torch.channels_last)
    x = torch.rand(32, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4, fused=True)

    def vae_step():
        with autocast:
            out, mu, logvar = vae(x)
        loss = negative_elbo(x, out, mu, logvar)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    print(f"compute: {'bf16 autocast' if bf16 else 'fp32'}, {opts.threads} threads, batch 32")
    print(f"VAE step: {timed(vae_step, opts.steps, 32):.0f} img/s")
    defaults = OmegaConf.load(ROOT_CONF)
    for name, changes in [("decoder L1 alone (adv_weight=0)", {"adv_weight": 0.0}),
                          *[(f"sharp step, disc_width={w}", {"disc_width": w, "adv_weight": 0.1}) for w in opts.widths]]:
        phase = SharpPhase(OmegaConf.merge(defaults, changes), vae, 0, True)
        print(f"{name}: {timed(lambda: phase.step(x, autocast, 1), opts.steps, 32):.0f} img/s")


if __name__ == "__main__":
    main()
