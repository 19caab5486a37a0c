"""Training throughput of the default model: this project's loop vs an ImageFolder + DataLoader baseline.

    .venv/bin/python bench/train_throughput.py [--steps 40] [--device auto]

Both sides train the same model (conf/model/default.yaml) with the same batch size, loss and
optimizer; only the input path differs. The pipeline side is `pipeline.train.train` itself (packed
uint8 array on the device, batches by index, flips on the device); the baseline decodes JPEG files
with torchvision's ImageFolder in a DataLoader with one worker per core. Also reports model FLOPs
per image (torch's FlopCounterMode) and the fraction of the device's peak: on a CPU the peak is
measured with a large fp32 matmul in the same run, on a GPU it is the card's dense bf16 figure.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.model import VAE, negative_elbo  # noqa: E402
from pipeline.pack import pack  # noqa: E402
from pipeline.runs import pick_device  # noqa: E402
from pipeline.train import train  # noqa: E402

FACES = ROOT.parent / "shared" / "data" / "faces" / "getchu-2000-2009"
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}


def flops_per_image(model_args, device) -> float:
    """Forward + backward FLOPs of one training image."""
    model = VAE(**model_args).to(device)
    x = torch.rand(8, 3, 64, 64, device=device)
    with FlopCounterMode(display=False) as counter:
        out, mu, logvar = model(x)
        negative_elbo(x, out, mu, logvar)[0].backward()
    return counter.get_total_flops() / len(x)


def cpu_peak_flops(seconds=3.0) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return n * 2 * 2048 ** 3 / (time.perf_counter() - start)


def baseline(model_args, batch_size, steps, device, workers) -> float:
    """images/s of the conventional input path: JPEG files -> ImageFolder -> DataLoader -> device."""
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(FACES, Path(tmp) / "faces")
        data = datasets.ImageFolder(tmp, transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor()]))
        loader = DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                            pin_memory=device.type == "cuda", persistent_workers=True)
        model = VAE(**model_args).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
        batches = iter(loader)
        start = None
        for i in range(steps + 5):
            if i == 5:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            x, _ = next(batches)
            x = x.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out, mu, logvar = model(x)
            loss = negative_elbo(x, out, mu, logvar)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * batch_size / (time.perf_counter() - start)


def pipeline_loop(data_dir, out_dir, steps, device) -> tuple[float, dict]:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data_dir={data_dir}", f"paths.output_dir={out_dir}",
                                          f"device={device}", f"train.max_steps={steps}",
                                          f"train.log_every={steps}", f"train.ckpt_every={10 * steps}",
                                          f"preset={'gpu' if device.type == 'cuda' else 'cpu'}",
                                          "train.prior_components=1"])  # the prior fit is not what is timed
    summary = train(cfg, run_dir=Path(out_dir) / "run")
    return summary["img_per_s"], cfg


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device, 0)
    with tempfile.TemporaryDirectory() as tmp:
        from omegaconf import OmegaConf
        pack(OmegaConf.create({"faces_dir": str(FACES), "size": 64, "test_fraction": 0.05, "near_dup_bits": 4,
                               "drop_near_duplicates": False, "train_file": f"{tmp}/train.npy",
                               "test_file": f"{tmp}/test.npy"}))
        ours, cfg = pipeline_loop(tmp, f"{tmp}/out", args.steps, device)
    model_args = {"image_size": 64, "width": cfg.model.width, "depth": cfg.model.depth,
                  "latent_dim": cfg.model.latent_dim, "max_channels": cfg.model.max_channels}
    theirs = baseline(model_args, cfg.train.batch_size, args.steps, device, os.cpu_count())
    flops = flops_per_image(model_args, device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
        peak_what = f"{name} dense bf16 {peak / 1e12:.0f} TFLOP/s" if peak else f"{name} (peak unknown)"
    else:
        peak = cpu_peak_flops()
        peak_what = f"fp32 2048^2 matmul on this CPU, {peak / 1e9:.0f} GFLOP/s measured"
    print(f"device: {device} ({torch.get_num_threads()} threads), batch {cfg.train.batch_size}, {args.steps} steps each")
    print(f"model: {flops / 1e6:.0f} MFLOP per training image (forward + backward)")
    for label, rate in (("baseline ImageFolder + DataLoader", theirs), ("pipeline.train (packed, on device)", ours)):
        util = f"{100 * rate * flops / peak:.1f}% of {peak_what}" if peak else "n/a"
        print(f"{label}: {rate:.0f} img/s, {rate * flops / 1e9:.1f} GFLOP/s, {util}")
    print(f"speed-up x{ours / theirs:.2f}")


if __name__ == "__main__":
    main()
