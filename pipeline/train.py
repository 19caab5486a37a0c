"""Stage 4: train the VAE on the packed faces.

    python -m pipeline.train obs_std=0.1                                   # one GPU, or the CPU
    torchrun --standalone --nproc_per_node=8 -m pipeline.train             # 8 GPUs on one machine
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 --rdzv_id=faces -m pipeline.train       # 2 machines (node_rank 1 on the other)

The packed uint8 dataset lives on the training device; batches are gathered by index and flipped
there, so no image is decoded during training. Rank 0 owns every output: checkpoints (atomic,
resumable to the exact step), metrics.csv, TensorBoard events, grids and the resolved config.
"""
import csv
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image
from tqdm import tqdm

from pipeline.errors import PipelineError, exit_on_error
from pipeline.io import atomic_save
from pipeline.model import VAE, bits_per_dim, negative_elbo
from pipeline.runs import CKPT_FORMAT, CKPT_NAME, find_checkpoint, load_checkpoint

log = logging.getLogger(__name__)

METRIC_FIELDS = ["step", "epoch", "loss", "nll", "kl", "lr", "img_per_s", "test_elbo", "test_nll",
                 "test_kl", "test_bpd"]


class TrainError(PipelineError):
    pass


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise TrainError(f"device={name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device={name} but CUDA is not available here: use device=auto or device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainError(f"device={name} but MPS is not available here: use device=auto or device=cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def load_split(path, name: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{name} split not found at {path}: run `make data` first (or "
                         f"`python -m pipeline.pack pack.faces_dir=FOLDER` for a folder of face tiles), "
                         f"or point paths.data_dir / train.{name}_file at it")
    array = np.load(path, mmap_mode="r")
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] != 3 or array.shape[2] != array.shape[3]:
        raise TrainError(f"{path} holds {array.dtype} {array.shape}; expected uint8 N x 3 x H x H "
                         "as written by `make data`. Re-run `python -m pipeline.pack`")
    if len(array) == 0:
        raise TrainError(f"{path} is empty: no faces were packed. Check `make data`'s summary")
    return np.array(array)  # one read into memory (the file stays untouched)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_order(n: int, epoch: int, seed: int, rank: int, world: int, device) -> torch.Tensor:
    """This rank's shard of the epoch's permutation; the same on every run with the same seed."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    per_rank = n // world
    return order[rank * per_rank:(rank + 1) * per_rank].to(device)


def to_float(batch_uint8: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = batch_uint8.float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def evaluate_elbo(model: VAE, data: torch.Tensor, likelihood: str, obs_std: float, batch_size: int = 500) -> dict:
    """Test -ELBO per image (one posterior sample, fixed noise) and in bits per dimension."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=data.device).manual_seed(1234)
    totals = torch.zeros(3, dtype=torch.float64, device=data.device)
    for start in range(0, len(data), batch_size):
        x = to_float(data[start:start + batch_size], False)
        mu, logvar = model.encode(x)
        z = mu + torch.randn(mu.shape, generator=generator, device=mu.device) * torch.exp(0.5 * logvar)
        _, nll, kl = negative_elbo(x, model.decode(z), mu, logvar, likelihood, obs_std)
        totals += torch.stack([nll + kl, nll, kl]).double() * len(x)
    model.train(was_training)
    neg_elbo, nll, kl = (totals / len(data)).tolist()
    return {"test_elbo": -neg_elbo, "test_nll": nll, "test_kl": kl,
            "test_bpd": bits_per_dim(neg_elbo, data[0].numel())}


@torch.no_grad()
def save_grids(model: VAE, test: torch.Tensor, run_dir: Path, epoch: int, n: int) -> None:
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=test.device).manual_seed(0)
    z = torch.randn(n, model.latent_dim, generator=generator, device=test.device)
    save_image(torch.sigmoid(model.decode(z)), run_dir / f"samples_epoch{epoch:03d}.png", nrow=8)
    x = to_float(test[: n // 2], False)
    recon = torch.sigmoid(model.decode(model.encode(x)[0]))
    rows = torch.cat([torch.stack([x[i:i + 8], recon[i:i + 8]]).flatten(0, 1) for i in range(0, len(x), 8)])
    save_image(rows, run_dir / f"recon_epoch{epoch:03d}.png", nrow=8)
    model.train(was_training)


class Stop:
    """SIGTERM / Ctrl-C: finish the step, save a checkpoint, then exit."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.signum = signum


def dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def broadcast(value, rank: int, world: int):
    """Rank 0's value on every rank (rank 0 owns paths)."""
    if world == 1:
        return value
    holder = [value if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def resolve_resume(cfg) -> Path | None:
    if cfg.resume is None:
        return None
    if str(cfg.resume) == "latest":
        return find_checkpoint(cfg.paths.output_dir, obs_std=cfg.obs_std)
    return find_checkpoint(cfg.paths.output_dir, ckpt=cfg.resume)


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict:
    rank, world, local_rank = dist_env()
    if cfg.likelihood == "gaussian" and not float(cfg.obs_std) > 0:
        raise TrainError(f"obs_std={cfg.obs_std} must be > 0 (it is the std of p(x|z) on [0, 1] pixels; "
                         "try obs_std=0.1)")
    if cfg.likelihood not in ("gaussian", "bernoulli"):
        raise TrainError(f"likelihood={cfg.likelihood!r}: use gaussian or bernoulli")
    device = pick_device(str(cfg.device), local_rank)
    if device.type == "cpu":
        torch.set_num_threads(cfg.train.num_threads or max(1, (os.cpu_count() or 1) //
                                                            int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    train_np = load_split(cfg.train.train_file, "train")
    test_np = load_split(cfg.train.test_file, "test")
    if train_np.shape[1:] != test_np.shape[1:]:
        raise TrainError(f"train {train_np.shape} and test {test_np.shape} tiles differ in shape; re-run make data")
    per_rank = len(train_np) // world
    if per_rank < cfg.train.batch_size:
        raise TrainError(f"{len(train_np)} training faces over {world} processes is fewer than one batch "
                         f"(train.batch_size={cfg.train.batch_size}); lower the batch size or add data")
    train_data = torch.from_numpy(train_np).to(device)
    test_data = torch.from_numpy(test_np).to(device)

    resume_path = broadcast(resolve_resume(cfg) if rank == 0 else None, rank, world)
    if rank == 0 and run_dir is None:
        run_dir = resume_path.parent if resume_path else Path(HydraConfig.get().runtime.output_dir)
    run_dir = Path(broadcast(str(run_dir) if rank == 0 else None, rank, world))

    torch.manual_seed(cfg.seed)
    model_args = {"image_size": train_np.shape[-1], "width": cfg.model.width, "depth": cfg.model.depth,
                  "latent_dim": cfg.model.latent_dim, "max_channels": cfg.model.max_channels}
    model = VAE(**model_args).to(device)
    channels_last = bool(cfg.train.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=device.type == "cuda")
    steps_per_epoch = per_rank // cfg.train.batch_size
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio))
    step, best_test_elbo = 0, -math.inf
    torch.manual_seed(cfg.seed + rank)  # per-rank noise for flips and the reparameterisation
    if resume_path:
        ckpt = load_checkpoint(resume_path, map_location=device)
        if ckpt["model_args"] != model_args:
            raise TrainError(f"{resume_path} was trained with {ckpt['model_args']}, not {model_args}; "
                             "resume with the same model settings")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, best_test_elbo = ckpt["step"], ckpt["best_test_elbo"]
        rng = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0]
        torch.set_rng_state(rng["cpu"].cpu())
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
        log.info("resuming %s at step %d", resume_path, step)

    core = model
    if cfg.train.compile:
        model = torch.compile(model)
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.train.amp)

    writer = metrics_file = metrics = None
    ckpt_path = run_dir / CKPT_NAME
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(f".{CKPT_NAME}.*.part"):  # left by a save that was killed
            stale.unlink()
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        writer = SummaryWriter(str(run_dir / "tb"))
        new_file = not (run_dir / "metrics.csv").exists()
        metrics_file = open(run_dir / "metrics.csv", "a", newline="")
        metrics = csv.DictWriter(metrics_file, METRIC_FIELDS)
        if new_file:
            metrics.writeheader()
        if cfg.beta != 1:
            log.warning("beta=%s: the loss is NOT the ELBO (KL weighted by %s); reported ELBOs use beta=1",
                        cfg.beta, cfg.beta)
        log.info("run dir %s; %d train / %d test faces %s on %s x %d; %d steps (%d per epoch), model %.2fM params",
                 run_dir, len(train_np), len(test_np), tuple(train_np.shape[1:]), device, world, total_steps,
                 steps_per_epoch, sum(p.numel() for p in core.parameters()) / 1e6)

    def save_checkpoint():
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if rank == 0:
            state = {"format": CKPT_FORMAT, "model_args": model_args, "model": core.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                     "epoch": step // steps_per_epoch, "best_test_elbo": best_test_elbo, "rng": rngs,
                     "obs_std": float(cfg.obs_std), "likelihood": cfg.likelihood,
                     "config": OmegaConf.to_container(cfg, resolve=True)}
            atomic_save(ckpt_path, lambda tmp: torch.save(state, tmp))

    stop = Stop()
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    running = torch.zeros(3, device=device)
    last_good_step = step

    def check_finite():
        bad = int(first_bad_step)
        if bad >= 0:
            where = f"{ckpt_path} (step {last_good_step})" if ckpt_path.exists() else "none was written yet"
            raise TrainError(f"the loss became non-finite at step {bad}; the last good checkpoint is {where}. "
                             "Lower train.lr, raise obs_std, or check the data")

    start_step, t0, t_log, step_log = step, time.perf_counter(), time.perf_counter(), step
    order, order_epoch = None, -1
    progress = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=rank != 0)
    model.train()
    while step < total_steps:
        epoch, batch_no = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(train_np), epoch, cfg.seed, rank, world, device), epoch
        x = to_float(train_data[order[batch_no * cfg.train.batch_size:(batch_no + 1) * cfg.train.batch_size]],
                     channels_last)
        if cfg.train.flip:
            flip = torch.rand(len(x), 1, 1, 1, device=device) < 0.5
            x = torch.where(flip, x.flip(3), x)
        with autocast:
            out, mu, logvar = model(x)
        loss, nll, kl = negative_elbo(x, out, mu, logvar, cfg.likelihood, cfg.obs_std, cfg.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        finite = torch.isfinite(loss)
        first_bad_step = torch.where(~finite & (first_bad_step < 0), step, first_bad_step)
        running += torch.stack([loss, nll, kl]).detach()
        step += 1
        progress.update()

        end_of_epoch = step % steps_per_epoch == 0
        if step % cfg.train.log_every == 0 or end_of_epoch or step == total_steps:
            check_finite()
            now = time.perf_counter()
            img_s = (step - step_log) * cfg.train.batch_size * world / (now - t_log)
            avg = (running / (step - step_log)).tolist()
            running.zero_()
            t_log, step_log = now, step
            if rank == 0:
                row = {"step": step, "epoch": step / steps_per_epoch, "loss": avg[0], "nll": avg[1], "kl": avg[2],
                       "lr": scheduler.get_last_lr()[0], "img_per_s": img_s}
                progress.set_postfix(loss=f"{avg[0]:.1f}", kl=f"{avg[2]:.1f}", img_s=f"{img_s:.0f}")
                if end_of_epoch or step == total_steps:
                    row.update(evaluate_elbo(core, test_data, cfg.likelihood, cfg.obs_std, cfg.train.eval_batch_size))
                    best_test_elbo = max(best_test_elbo, row["test_elbo"])
                    save_grids(core, test_data, run_dir, math.ceil(step / steps_per_epoch), cfg.train.grid_n)
                    log.info("epoch %.2f step %d: test ELBO %.1f nats/image (%.3f bits/dim), nll %.1f, kl %.1f",
                             row["epoch"], step, row["test_elbo"], row["test_bpd"], row["test_nll"], row["test_kl"])
                metrics.writerow(row)
                metrics_file.flush()
                for key, value in row.items():
                    if key != "step":
                        writer.add_scalar(key, value, step)
        stop_now = torch.tensor(stop.signum, device=device)
        if world > 1:
            dist.all_reduce(stop_now, op=dist.ReduceOp.MAX)
        if step % cfg.train.ckpt_every == 0 or end_of_epoch or step == total_steps or int(stop_now):
            check_finite()
            save_checkpoint()
            last_good_step = step
        if int(stop_now):
            progress.close()
            if rank == 0:
                log.warning("stopped by signal %d at step %d; checkpoint %s; resume with: "
                            "python -m pipeline.train resume=%s", int(stop_now), step, ckpt_path, run_dir)
            raise SystemExit(128 + int(stop_now))
    progress.close()
    elapsed = time.perf_counter() - t0
    summary = {"run_dir": str(run_dir), "steps": step, "epochs": step / steps_per_epoch,
               "img_per_s": (step - start_step) * cfg.train.batch_size * world / max(elapsed, 1e-9),
               "best_test_elbo": best_test_elbo}
    if rank == 0:
        writer.close()
        metrics_file.close()
        log.info("done: %d steps, %.2f epochs, %.0f img/s, best test ELBO %.1f nats/image (%.3f bits/dim) -> %s",
                 step, summary["epochs"], summary["img_per_s"], best_test_elbo,
                 bits_per_dim(-best_test_elbo, train_np[0].size), ckpt_path)
    return summary


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
@exit_on_error
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    if dist_env()[0] > 0:  # only rank 0 writes a Hydra run folder and log file
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=."]
    main()
