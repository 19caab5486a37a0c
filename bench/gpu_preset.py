"""The GPU preset on one GPU (images/s, MFU, minutes) and the scaling rows behind it, in one call; FID here.

On the GPU machine (nothing there can be downloaded: the unique shared faces travel as a .tar.gz and
the pure-Python packages Hydra needs as a folder, see bench/RESULTS.md for the exact call):
    python bench/gpu_preset.py run --faces .gpu/faces.tar.gz --out $OUT --rows "cpu12:preset=cpu ..."
Back here, on the sample sheets it wrote (2,000 64x64 tiles per lossless WebP: a PNG of sharp samples can pass
the 16 MiB a returned file may have):
    .venv/bin/python bench/gpu_preset.py score DIR [--reference bench/out/outsource_faces]

`run`: packs the faces with `pipeline.pack`, times a bf16 matrix product (the MFU ceiling), counts the
preset's training FLOPs per image, trains `preset=gpu` alone (the timed row), then trains the --rows side
by side on the same GPU (step-count budgets defined on the CPU, trained here because they compute the same
steps; their speed is not reported), and draws 2,000 samples from each run's stored prior with the
seed `make eval` uses. A run still going at --deadline is sent SIGTERM (it checkpoints, stores its prior,
and says so in summary.json).
`score`: FID / KID of each sheet against bench/out/data's test split (and --reference), as `make eval`.
"""
import argparse
import csv
import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES, SHEET_COLUMNS = 2000, 50
DATASHEET_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16, the vendor's datasheet


# ---------------------------------------------------------------- on the GPU machine

def pack(faces_tar: Path, work: Path) -> dict:
    faces = work / "faces"
    with tarfile.open(faces_tar) as tar:
        tar.extractall(faces, filter="data")
    subprocess.run([sys.executable, "-m", "pipeline.pack", f"pack.faces_dir={faces}", f"paths.data_dir={work}/data",
                    f"paths.output_dir={work}/out", f"hydra.run.dir={work}/logs/pack"], cwd=ROOT, check=True)
    return {name: hashlib.sha1((work / "data" / f"{name}.npy").read_bytes()).hexdigest()
            for name in ("train", "test")}


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def train_flops_per_image(model_args: dict) -> float:
    """Multiply-adds x 2 of one forward and backward pass (convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode
    from pipeline.model import VAE, negative_elbo
    model, x = VAE(**model_args), torch.rand(16, 3, 64, 64)
    with FlopCounterMode(display=False) as counter:
        out, mu, logvar = model(x)
        negative_elbo(x, out, mu, logvar)[0].backward()
    return counter.get_total_flops() / len(x)


def start_train(name: str, overrides: list[str], work: Path, device: str) -> tuple[subprocess.Popen, Path]:
    run_dir = work / "runs" / name
    log = open(work / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", f"paths.data_dir={work}/data",
                             f"paths.output_dir={work}/out", f"hydra.run.dir={run_dir}", f"device={device}", *overrides],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return proc, run_dir


def wait(procs: dict, deadline: float) -> dict:
    """Each run's exit code and seconds; runs still going at the deadline get SIGTERM (then 60 s to save)."""
    started, result = time.time(), {}
    while True:
        for name, proc in procs.items():
            if name not in result and proc.poll() is not None:
                result[name] = {"returncode": proc.returncode, "seconds": time.time() - started}
        if len(result) == len(procs) or time.time() > deadline:
            break
        time.sleep(0.5)
    late = {name: proc for name, proc in procs.items() if name not in result}
    for proc in late.values():
        proc.send_signal(signal.SIGTERM)
    for name, proc in late.items():
        try:
            proc.wait(max(1.0, deadline + 60 - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        result[name] = {"returncode": proc.returncode, "seconds": time.time() - started, "stopped_at_deadline": True}
        print(f"{name}: stopped at the deadline", flush=True)
    return result


def run_summary(run_dir: Path) -> dict:
    """Steps, img/s (steady median of the log rows, and over the whole run) and the last test ELBO."""
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    rates = [float(r["img_per_s"]) for r in rows]
    tested = [r for r in rows if r["test_elbo"]]
    log = (run_dir / "train.log").read_text()
    done = re.search(r"done: (\d+) steps, [\d.]+ epochs, (\d+) img/s", log)
    return {"steps": int(rows[-1]["step"]), "img_per_s_median": statistics.median(rates),
            "img_per_s_run": float(done[2]) if done else None,
            "test_elbo": float(tested[-1]["test_elbo"]) if tested else None,
            "test_elbo_every_eval": [(int(r["step"]), round(float(r["test_elbo"]), 1)) for r in tested]}


def sample_sheet(run_dir: Path, prior_name: str, path: Path, device: str) -> float:
    """2,000 decoder means from the run's prior, seeded as `make eval` draws them, as one lossless image."""
    from pipeline.images import to_uint8
    from pipeline.prior import sample_latents
    from pipeline.runs import Run
    started = time.time()
    run = Run(run_dir / "ckpt.pt", torch.device(device))
    prior, _ = run.prior(prior_name, 100, 0)
    z = sample_latents(prior, N_SAMPLES, run.model.latent_dim, torch.Generator().manual_seed(0))
    tiles = to_uint8(run.decode(z)).numpy()
    rows = tiles.reshape(N_SAMPLES // SHEET_COLUMNS, SHEET_COLUMNS, 3, 64, 64).transpose(0, 3, 1, 4, 2)
    sheet = Image.fromarray(np.ascontiguousarray(rows.reshape(rows.shape[0] * 64, SHEET_COLUMNS * 64, 3)))
    sheet.save(path, lossless=True, quality=100)  # WebP: about 3/4 of the PNG's bytes
    return time.time() - started


def run(opts) -> None:
    out, begun = Path(opts.out), time.time()
    deadline = begun + opts.deadline
    work = Path(tempfile.mkdtemp(prefix="gpu_preset_"))
    cuda = opts.device == "cuda"
    summary = {"device": torch.cuda.get_device_name() if cuda else opts.device, "torch": torch.__version__}
    summary["data_sha1"] = pack(Path(opts.faces), work)
    summary["matmul_bf16_tflops"] = matmul_tflops() if cuda else None
    torch.cuda.empty_cache()
    jobs = {"gpu": ["preset=gpu", *opts.preset_args]}
    jobs.update(dict(row.split(":", 1) for row in opts.rows))
    jobs = {name: args if isinstance(args, list) else args.split() for name, args in jobs.items()}

    print(f"{time.time() - begun:.0f} s: packed; training the preset", flush=True)
    proc, run_dir = start_train("gpu", jobs["gpu"], work, opts.device)
    summary["runs"] = {"gpu": wait({"gpu": proc}, deadline - opts.rows_seconds)["gpu"]}
    ckpt = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    flops = train_flops_per_image(ckpt["model_args"])
    summary["runs"]["gpu"].update(run_summary(run_dir), train_gflops_per_image=flops / 1e9,
                                  model_args=ckpt["model_args"], config=ckpt["config"]["train"])
    for key in ("img_per_s_median", "img_per_s_run"):
        rate = summary["runs"]["gpu"][key]
        summary["runs"]["gpu"][key.replace("img_per_s", "mfu")] = rate and cuda and {
            "vs_measured_matmul": rate * flops / 1e12 / summary["matmul_bf16_tflops"],
            "vs_datasheet": rate * flops / 1e12 / DATASHEET_BF16_TFLOPS}
    summary["runs"]["gpu"]["sample_2000_seconds"] = sample_sheet(run_dir, "default", out / "gpu_default.webp",
                                                                 opts.device)
    if opts.normal:
        sample_sheet(run_dir, "normal", out / "gpu_normal.webp", opts.device)
    subprocess.run([sys.executable, "-m", "pipeline.sample", f"paths.output_dir={work}/out", f"ckpt={run_dir}",
                    f"hydra.run.dir={work}/logs/sample", "+obs_std=0.1"], cwd=ROOT, check=False,
                   stdout=open(work / "sample.log", "w"), stderr=subprocess.STDOUT)
    write_summary(out, summary, work)

    print(f"{time.time() - begun:.0f} s: preset done:", {k: v for k, v in summary["runs"]["gpu"].items()
                                                          if k not in ("config", "test_elbo_every_eval")}, flush=True)
    started = {name: start_train(name, args, work, opts.device) for name, args in jobs.items() if name != "gpu"}
    finished = wait({name: p for name, (p, _) in started.items()}, deadline)
    for name, (_, row_dir) in started.items():
        summary["runs"][name] = {**finished[name], "args": jobs[name]}
        try:  # one broken row must not lose the others
            summary["runs"][name].update(run_summary(row_dir))
            sample_sheet(row_dir, "default", out / f"{name}_default.webp", opts.device)
        except Exception as err:
            summary["runs"][name]["error"] = repr(err)
    summary["seconds"] = time.time() - begun
    write_summary(out, summary, work)


def write_summary(out: Path, summary: dict, work: Path) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        last_grids = [max(run.glob("samples_epoch*.png")) for run in (work / "runs").iterdir()
                      if any(run.glob("samples_epoch*.png"))]
        for path in [*work.glob("*.log"), *(work / "runs").glob("*/metrics.csv"), *(work / "runs").glob("*/train.log"),
                     *last_grids, *(work / "runs").glob("*/samples_*seed*.png")]:
            tar.add(path, arcname=str(path.relative_to(work)))


# ---------------------------------------------------------------- here: FID / KID of the sheets

def read_sheet(path: Path) -> np.ndarray:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    rows, columns = pixels.shape[0] // 64, pixels.shape[1] // 64
    return pixels.reshape(rows, 64, columns, 64, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, 64, 64)


def score(opts) -> None:
    from pipeline.evaluate import cached_features, reference_faces
    from pipeline.metrics import InceptionFeatures, features, fid_kid
    from pipeline.runs import load_split
    extractor, cache = InceptionFeatures("cpu"), ROOT / "bench" / "out" / "fid_cache"
    real = {"test": cached_features(extractor, load_split(opts.test, "test"), cache, 100)}
    if opts.reference:
        real["reference"] = cached_features(extractor, reference_faces(opts.reference, 64), cache, 100)
    print("| sheet | n | " + " | ".join(f"FID {k} | KID {k} x1e3" for k in real) + " |")
    for sheet in sorted(p for p in Path(opts.dir).iterdir() if p.suffix in (".png", ".webp")):
        fake = features(extractor, read_sheet(sheet), 100)
        scores = {k: fid_kid(r, fake) for k, r in real.items()}
        print(f"| {sheet.stem} | {len(fake)} | " +
              " | ".join(f"{s['fid']:.1f} | {1e3 * s['kid']:.1f}" for s in scores.values()) + " |", flush=True)


def main():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    on_gpu = commands.add_parser("run")
    on_gpu.add_argument("--faces", required=True, help=".tar.gz of face tiles")
    on_gpu.add_argument("--out", required=True)
    on_gpu.add_argument("--rows", nargs="*", default=[], help='"name:override override ..." trained side by side')
    on_gpu.add_argument("--preset-args", nargs="*", default=[], help="extra overrides for the preset=gpu run")
    on_gpu.add_argument("--normal", action="store_true", help="also the preset's N(0, I) sheet (64 MiB come back)")
    on_gpu.add_argument("--device", default="cuda", help="cpu: a small trial of the whole call here")
    on_gpu.add_argument("--deadline", type=float, default=480, help="seconds for everything")
    on_gpu.add_argument("--rows-seconds", type=float, default=200, help="seconds kept for the rows")
    here = commands.add_parser("score")
    here.add_argument("dir")
    here.add_argument("--test", default=str(ROOT / "bench" / "out" / "data" / "test.npy"))
    here.add_argument("--reference")
    opts = parser.parse_args()
    if opts.command == "run":
        run(opts)
    else:
        score(opts)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
