"""The README's pictures of faces you can ask for: one row per hair colour, and faces along a named slider.

    .venv/bin/python bench/hair_pictures.py --run RUN_FOLDER [--slider blonde] [--out docs]

docs/hair.jpg: 8 faces of each offered colour (`hair=<colour>`, seed 0), a label per row;
docs/slider.jpg: 6 faces of the stored prior, each moved along "towards <slider>" from -1 to +2.
"""
import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from pipeline.images import to_uint8
from pipeline.prior import sample_latents
from pipeline.runs import Run


def labelled(grid: torch.Tensor, labels: list[str], row: int, margin: int = 70) -> Image.Image:
    image = Image.fromarray(to_uint8(grid).permute(1, 2, 0).numpy())
    canvas = Image.new("RGB", (image.width + margin, image.height), "white")
    canvas.paste(image, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        draw.text((4, i * row + row // 2 - 6), label, fill="black")
    return canvas


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--slider", default="blonde")
    parser.add_argument("--out", default="docs")
    opts = parser.parse_args()
    run = Run(Path(opts.run) / "ckpt.pt", torch.device("cpu"))
    colours = list(run.hair()["colours"])
    rows = [run.decode(sample_latents(run.hair_prior(c), 8, run.model.latent_dim, torch.Generator().manual_seed(0)))
            for c in colours]
    grid = make_grid(torch.cat(rows), nrow=8, padding=2, pad_value=1.0)
    labelled(grid, colours, 66).save(Path(opts.out) / "hair.jpg", quality=90)
    prior, _ = run.prior("default", 100, 0)
    z = sample_latents(prior, 6, run.model.latent_dim, torch.Generator().manual_seed(3))
    steps = torch.linspace(-1, 2, 7)
    moved = torch.cat([run.steered(z[i:i + 1].expand(7, -1), {}) + steps[:, None] *
                       run.sliders()[0][opts.slider]["direction"] for i in range(len(z))])
    grid = make_grid(run.decode(moved), nrow=7, padding=2, pad_value=1.0)
    labelled(grid, [f"face {i + 1}" for i in range(len(z))], 66).save(Path(opts.out) / "slider.jpg", quality=90)
    print(Path(opts.out) / "hair.jpg", Path(opts.out) / "slider.jpg")


if __name__ == "__main__":
    main()
