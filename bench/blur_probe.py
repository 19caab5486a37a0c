"""Is it the grain? FID of a run's sharp-decoder samples after a fixed 3x3 binomial blur of the pictures,
beside the figure `make eval` gives them unblurred: a decoder whose detail is right but carries a
pixel-level checkerboard (transposed convolutions under an adversarial term) scores much better blurred.

    .venv/bin/python bench/blur_probe.py RUN [RUN ...] [--n 1000]
    .venv/bin/python bench/blur_probe.py RUN --real 0 1 2 4 8

The codes are the ones `pipeline.evaluate` draws (the stored prior, seed 0), scored against the test split.
--real scores n real training faces of RUN's data blurred that many times instead: the FID a decoder with
every face's structure right would get at each sharpness, i.e. what blur alone costs.
"""
import argparse
from pathlib import Path

import torch
from torch.nn import functional as F

from pipeline.evaluate import cached_features
from pipeline.images import to_float, to_uint8
from pipeline.metrics import InceptionFeatures, features, fid_kid, sharpness
from pipeline.prior import sample_latents
from pipeline.runs import Run, find_checkpoint

BINOMIAL = torch.tensor([1.0, 2.0, 1.0])


def blurred(images: torch.Tensor) -> torch.Tensor:
    """Each channel convolved with the 3x3 binomial filter (edges replicated)."""
    kernel = (BINOMIAL[:, None] * BINOMIAL[None, :] / 16).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(images, [1, 1, 1, 1], mode="replicate"), kernel, groups=3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="run folders with a sharp decoder")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--cache", default="bench/out/fid_cache")
    parser.add_argument("--real", type=int, nargs="+", help="blur passes over real training faces instead")
    opts = parser.parse_args()
    extractor = InceptionFeatures("cpu")
    print("| run | pictures | FID test | KID x1e3 | sharpness |\n| --- | --- | --- | --- | --- |")
    if opts.real:
        return score_blurred_real_faces(extractor, opts)
    for folder in opts.runs:
        run = Run(find_checkpoint(None, ckpt=folder), torch.device("cpu"))
        test = run.split("test")
        real_test = cached_features(extractor, test, Path(opts.cache), 100)
        prior, _ = run.prior("default", 100, 0)
        z = sample_latents(prior, opts.n, run.model.latent_dim, torch.Generator().manual_seed(0))
        print_row(Path(folder).name, "blurred 3x3", to_uint8(blurred(run.decode(z))).numpy(), extractor, real_test,
                  test)


def score_blurred_real_faces(extractor, opts) -> None:
    run = Run(find_checkpoint(None, ckpt=opts.runs[0]), torch.device("cpu"))
    test, train = run.split("test"), run.split("train")
    real_test = cached_features(extractor, test, Path(opts.cache), 100)
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:opts.n].numpy()
    for passes in opts.real:
        images = to_float(torch.from_numpy(train[chosen]))
        for _ in range(passes):
            images = blurred(images)
        print_row("real training faces", f"blurred 3x3 x{passes}", to_uint8(images).numpy(), extractor, real_test,
                  test)


def print_row(name: str, pictures: str, images, extractor, real_test, test) -> None:
    """One table row: FID / KID of `images` (uint8) against the test split's features, sharpness against its faces'."""
    result = fid_kid(real_test, features(extractor, images, 100))
    print(f"| {name} | {pictures} | {result['fid']:.1f} | {1e3 * result['kid']:.1f} | "
          f"{sharpness(images) / sharpness(test):.2f} |", flush=True)


if __name__ == "__main__":
    main()
