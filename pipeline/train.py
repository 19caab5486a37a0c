"""Stage 4: train the VAE on the packed faces.

    python -m pipeline.train obs_std=0.1                                   # one GPU, or the CPU
    torchrun --standalone --nproc_per_node=8 -m pipeline.train             # 8 GPUs on one machine
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 --rdzv_id=faces -m pipeline.train       # 2 machines (node_rank 1 on the other)

The packed uint8 dataset lives on the training device; batches are gathered by index and flipped
there, so no image is decoded during training. Rank 0 owns every output: checkpoints (atomic,
resumable to the exact step), metrics.csv, TensorBoard events, grids and the resolved config.

`train()` runs the phases below in order, each a function of its own:
setup_processes -> load_splits -> build -> (restore_checkpoint) -> RunOutputs (pipeline/outputs.py) -> train_loop
-> store_prior.
The loop runs the VAE's steps, then (sharp.epochs > 0) the sharp decoder's (pipeline/adversarial.py) on the
frozen VAE's codes, or (sharp.joint_from) both on the same batches from that step: one loop, one checkpoint,
the step decides what trains.
"""
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from hydra import compose
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from pipeline.adversarial import SHARP_FIELDS, Phases, SharpConfig, SharpPhase, decoder_width_problem
from pipeline.attributes import hair_for_run, load_hair, save_hair
from pipeline.config import Paths, checked, key
from pipeline.cpu import FreeCores, allowed_cores
from pipeline.errors import PipelineError, WriteError, exit_on_error, hydra_output_dir, remove_if_no_results
from pipeline.images import to_float
from pipeline.io import AppendOnly
from pipeline.model import VAE, ModelConfig, bits_per_dim, encode_means, evaluate_elbo, negative_elbo
from pipeline.outputs import RunOutputs, prior_not_stored, stopped_writing
from pipeline.prior import fit_gmm_prior, load_prior, save_prior
from pipeline.resume import (Progress, checkpoint_state, command_line_keys, record_resume, resolve_resume,
                             restore_checkpoint, resume_config, rng_states)
from pipeline.runs import load_split, pick_device

log = logging.getLogger(__name__)

class TrainError(PipelineError):
    pass


@dataclass
class TrainConfig:
    """The keys of conf/train/default.yaml, their types and ranges."""
    train_file: str = key()
    test_file: str = key()
    batch_size: int = key(low=1)
    epochs: int = key(low=1)
    max_steps: int | None = key(low=1)
    lr: float = key(low=1e-12)
    min_lr_ratio: float = key(low=0, high=1)
    warmup_steps: int = key(low=0)
    kl_warmup_steps: int = key(low=0)
    weight_decay: float = key(low=0)
    flip: bool = key()
    ckpt_every: int = key(low=1)
    log_every: int = key(low=1)
    eval_every: int = key(low=1)
    eval_batch_size: int = key(low=1)
    grid_n: int = key(low=1)
    amp: str = key(choices=("auto", "true", "false", "True", "False"))
    channels_last: bool = key()
    fused_adam: bool = key()
    compile: bool = key()
    num_threads: int | None = key(low=1)
    prior_components: int = key(low=1)
    ema: float = key(low=0, high=0.999999)


@dataclass
class TrainJob:
    """conf/train.yaml: the groups and the keys that define a run."""
    paths: Paths = key(default=Paths)
    model: ModelConfig = key(default=ModelConfig)
    train: TrainConfig = key(default=TrainConfig)
    sharp: SharpConfig = key(default=SharpConfig)
    preset_name: str = key(choices=("auto", "cpu", "gpu"))
    obs_std: float = key()  # > 0, checked by check_objective with a hint
    likelihood: str = key(choices=("gaussian", "bernoulli"))
    beta: float = key(low=0)
    device: str = key()
    seed: int = key(low=0)
    resume: str | None = key()


@dataclass
class Proc:
    """This process's place in the job, the device it trains on, and whether it computes in bf16."""
    rank: int
    world: int
    device: torch.device
    bf16: bool = False
    free_cores: FreeCores | None = None  # on a CPU without train.num_threads: threads follow the free cores

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class Parts:
    """What training updates: the model (`core`, and `net` wrapped for compile/DDP), its optimizer and
    schedule, and (train.ema > 0) an exponential moving average of its weights, which samples."""
    core: VAE
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    model_args: dict
    ema: AveragedModel | None = None
    sharp: SharpPhase | None = None  # the sharp decoder's phase, once it has begun

    @property
    def sampler(self) -> VAE:
        """The weights that make pictures: the average when there is one."""
        return self.ema.module if self.ema is not None else self.core

    def start_sharp(self, cfg, rank: int) -> SharpPhase:
        """The sharp decoder's phase: a copy of the sampling VAE's decoder and a new discriminator."""
        if self.sharp is None:
            self.sharp = SharpPhase(cfg.sharp, self.sampler, cfg.seed, cfg.train.channels_last, rank)
        return self.sharp


# ---------------------------------------------------------------- phase 1: processes and device

def dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def check_objective(cfg) -> None:
    if cfg.likelihood not in ("gaussian", "bernoulli"):
        raise TrainError(f"likelihood={cfg.likelihood!r}: use gaussian or bernoulli")
    if cfg.likelihood == "gaussian" and not float(cfg.obs_std) > 0:
        raise TrainError(f"obs_std={cfg.obs_std} must be > 0 (it is the std of p(x|z) on [0, 1] pixels; "
                         "try obs_std=0.1)")


def check_sharp(cfg) -> None:
    """Before the VAE's steps, not after them: a sharp decoder that cannot be built."""
    problem = decoder_width_problem(cfg.sharp.decoder_width, cfg.model)
    if problem:
        raise TrainError(problem)


def sharp_phases(cfg, vae_steps: int, steps_per_epoch: int) -> Phases:
    try:
        return Phases.of(cfg.sharp, vae_steps, steps_per_epoch)
    except ValueError as err:
        raise TrainError(str(err)) from None


def setup_processes(cfg) -> Proc:
    """The device, CPU threads (train.num_threads, else the cores other processes leave free, followed as
    the load changes) and (under torchrun) the process group: NCCL on CUDA, gloo elsewhere."""
    rank, world, local_rank = dist_env()
    device = pick_device(str(cfg.device), local_rank)
    free_cores = None
    if device.type == "cpu" and cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    elif device.type == "cpu":  # the cores other processes leave free, followed as the load changes
        free_cores = FreeCores(max(1, len(allowed_cores()) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    bf16 = use_bf16(str(cfg.train.amp), device.type)
    if rank == 0:
        log.info("compute: %s on %s", "bf16 autocast" if bf16 else "fp32", device)
        if bf16 and device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("train.amp=true on a CPU without AMX or AVX512-BF16: bf16 is emulated there "
                        "(11 vs 210-235 img/s fp32 measured on such a CPU); use train.amp=auto")
    return Proc(rank, world, device, bf16, free_cores)


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: without them bf16 autocast on a CPU is emulated and much slower."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def use_bf16(amp: str, device_type: str) -> bool:
    """train.amp: auto = bf16 on CUDA and on CPUs with native bf16 (AMX or AVX512-BF16; emulated bf16 is
    ~20x slower than fp32); true forces it on CUDA or any CPU; false turns it off."""
    if amp not in ("auto", "True", "False", "true", "false"):
        raise TrainError(f"train.amp={amp!r}: use auto, true or false")
    if amp != "auto":
        return amp.lower() == "true" and device_type in ("cuda", "cpu")
    return device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16())


def broadcast(value, proc: Proc):
    """Rank 0's value on every rank (rank 0 owns paths)."""
    if proc.world == 1:
        return value
    holder = [value if proc.main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ---------------------------------------------------------------- phase 2: the packed splits

def load_splits(cfg, proc: Proc) -> tuple[np.ndarray, np.ndarray]:
    train_np = load_split(cfg.train.train_file, "train")
    test_np = load_split(cfg.train.test_file, "test")
    if train_np.shape[1:] != test_np.shape[1:]:
        raise TrainError(f"train {train_np.shape} and test {test_np.shape} tiles differ in shape; re-run make data")
    if len(train_np) // proc.world < cfg.train.batch_size:
        raise TrainError(f"{len(train_np)} training faces over {proc.world} processes is fewer than one batch "
                         f"(train.batch_size={cfg.train.batch_size}); lower the batch size or add data")
    return train_np, test_np


# ---------------------------------------------------------------- phase 3: model, optimizer, schedule

def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def kl_weight(step: int, warmup: int) -> float:
    """The KL term's weight at `step`: rising linearly to 1 over the first `warmup` steps, then 1 (the ELBO)."""
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def build(cfg, image_size: int, proc: Proc, total_steps: int) -> Parts:
    """Model (seeded by cfg.seed, so every rank starts equal), AdamW, warmup + cosine schedule."""
    torch.manual_seed(cfg.seed)
    model_args = {"image_size": image_size, **OmegaConf.to_container(cfg.model)}
    core = VAE(**model_args).to(proc.device)
    if cfg.train.channels_last:
        core = core.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(core.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=cfg.train.fused_adam and proc.device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio))
    ema = None
    if cfg.train.ema:
        if not 0 < cfg.train.ema < 1:
            raise TrainError(f"train.ema={cfg.train.ema} must be in (0, 1) (e.g. 0.999), or 0 for no average")
        ema = AveragedModel(core, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema), use_buffers=True)
    return Parts(core, core, optimizer, scheduler, model_args, ema)


def wrap(cfg, parts: Parts, proc: Proc) -> None:
    """torch.compile and DistributedDataParallel, after any checkpoint is restored into `core`."""
    if cfg.train.compile:
        parts.net = torch.compile(parts.net)
    if proc.world > 1:
        parts.net = DistributedDataParallel(parts.net, device_ids=[proc.device.index]
                                            if proc.device.type == "cuda" else None)


# ---------------------------------------------------------------- phase 5: rank-0 outputs (pipeline/outputs.py)

def open_outputs(cfg, proc: Proc, resume_path: Path | None, run_dir: Path | None,
                 step: int) -> tuple[Path, RunOutputs | None]:
    """The run folder (rank 0 picks it: the resumed run's, or Hydra's) and, on rank 0, its writers."""
    if proc.main and run_dir is None:
        run_dir = resume_path.parent if resume_path else Path(HydraConfig.get().runtime.output_dir)
    run_dir = Path(broadcast(str(run_dir) if proc.main else None, proc))
    return run_dir, RunOutputs(cfg, run_dir, step if resume_path else None) if proc.main else None


# ---------------------------------------------------------------- phase 6: the loop

class Stop:
    """SIGTERM / Ctrl-C: finish the step, save a checkpoint, then exit."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.signum = signum

    def agreed(self, proc: Proc) -> int:
        """The signal any rank received (all ranks stop together)."""
        if proc.world == 1:
            return self.signum  # no device tensor: reading one back would wait for the GPU every step
        signum = torch.tensor(self.signum, device=proc.device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        return int(signum)


class Meter:
    """Running sums of a step's losses between log rows, kept on the device (no sync per step),
    and the first step whose losses were not finite."""

    def __init__(self, proc: Proc, step: int):
        self.sums = 0
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=proc.device)
        self.since_step, self.since_time = step, time.perf_counter()

    def add(self, step: int, values: torch.Tensor) -> None:
        self.first_bad_step = torch.where(~torch.isfinite(values).all() & (self.first_bad_step < 0), step,
                                          self.first_bad_step)
        self.sums = self.sums + values

    def check_finite(self, ckpt_path: Path, last_good_step: int) -> None:
        bad = int(self.first_bad_step)
        if bad >= 0:
            where = f"{ckpt_path} (step {last_good_step})" if ckpt_path.exists() else "none was written yet"
            raise TrainError(f"the loss became non-finite at step {bad}; the last good checkpoint is {where}. "
                             "Lower train.lr, raise obs_std, or check the data")

    def take(self, step: int, images_per_step: int) -> tuple[list[float], float]:
        """Mean losses and images/s since the last take."""
        now = time.perf_counter()
        img_s = (step - self.since_step) * images_per_step / (now - self.since_time)
        means = (self.sums / (step - self.since_step)).tolist()
        self.sums = 0
        self.since_step, self.since_time = step, now
        return means, img_s


def epoch_order(n: int, epoch: int, seed: int, proc: Proc) -> torch.Tensor:
    """This rank's shard of the epoch's permutation; the same on every run with the same seed."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    per_rank = n // proc.world
    return order[proc.rank * per_rank:(proc.rank + 1) * per_rank].to(proc.device)


def next_batch(cfg, data: torch.Tensor, order: torch.Tensor, batch_no: int, device) -> torch.Tensor:
    """Floats in [0, 1], gathered by index on the device and randomly mirrored there."""
    x = to_float(data[order[batch_no * cfg.train.batch_size:(batch_no + 1) * cfg.train.batch_size]])
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if cfg.train.flip:
        flip = torch.rand(len(x), 1, 1, 1, device=device) < 0.5
        x = torch.where(flip, x.flip(3), x)
    return x


def log_row(cfg, outputs: RunOutputs, parts: Parts, meter: Meter, progress: Progress, phases: Phases,
            test: torch.Tensor, steps_per_epoch: int, images_per_step: int, evaluate_now: bool, bar: tqdm) -> None:
    """A metrics row (all ranks reset their meters; rank 0 writes) of the VAE's and / or the sharp decoder's
    losses, with the VAE's test ELBO and grids when `evaluate_now` while it trains, the sharp decoder's grids
    while that trains (rows never span a phase's start or end: the loop logs there)."""
    step = progress.step
    means, img_s = meter.take(step, images_per_step)
    if outputs is None:
        return
    row = {"step": step, "epoch": step / steps_per_epoch, "img_per_s": img_s}
    vae_row, sharp_row = phases.trains_vae(step - 1), phases.trains_sharp(step - 1)
    epoch = math.ceil(step / steps_per_epoch)
    if sharp_row:
        row.update(parts.sharp.row(means[3:]), lr=cfg.sharp.lr)
        bar.set_postfix(rec=f"{means[3]:.4f}", disc=f"{means[5]:.3f}", img_s=f"{img_s:.0f}")
        if evaluate_now:
            outputs.save_grids(parts.sharp.sampler, test, epoch, prefix="sharp_")
            log.info("epoch %.2f step %d: %s", row["epoch"], step, parts.sharp.summary(means[3:]))
    if vae_row:
        row.update(zip(["loss", "nll", "kl"], means[:3]), lr=parts.scheduler.get_last_lr()[0])
        bar.set_postfix(loss=f"{means[0]:.1f}", kl=f"{means[2]:.1f}", img_s=f"{img_s:.0f}")
    if evaluate_now and vae_row:
        row.update(evaluate_elbo(parts.core, test, cfg.likelihood, cfg.obs_std, cfg.train.eval_batch_size))
        progress.best_test_elbo = max(progress.best_test_elbo, row["test_elbo"])
        outputs.save_grids(parts.sampler, test, epoch)
        log.info("epoch %.2f step %d: test ELBO %.1f nats/image (%.3f bits/dim), nll %.1f, kl %.1f",
                 row["epoch"], step, row["test_elbo"], row["test_bpd"], row["test_nll"], row["test_kl"])
    outputs.write_row(row)


def vae_step(cfg, parts: Parts, x: torch.Tensor, autocast, step: int) -> torch.Tensor:
    """Forward (bf16 where the hardware has it), the exact -ELBO in fp32, one optimizer step: (loss, nll, kl)."""
    with autocast:
        out, mu, logvar = parts.net(x)
    beta = cfg.beta * kl_weight(step, cfg.train.kl_warmup_steps)
    loss, nll, kl = negative_elbo(x, out, mu, logvar, cfg.likelihood, cfg.obs_std, beta)
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts.optimizer.step()
    parts.scheduler.step()
    if parts.ema is not None:
        parts.ema.update_parameters(parts.core)
    return torch.stack([loss, nll, kl]).detach()


def train_loop(cfg, proc: Proc, parts: Parts, progress: Progress, train_data: torch.Tensor,
               test_data: torch.Tensor, outputs: RunOutputs | None, phases: Phases) -> int:
    """Train the VAE and the sharp decoder at the steps `phases` gives each; returns 0, or the signal that
    stopped it (after a checkpoint)."""
    stop, meter = Stop(), Meter(proc, progress.step)
    bar = tqdm(total=phases.total, initial=progress.step, desc="train", unit="step", disable=not proc.main)
    parts.net.train()
    try:
        signum = run_steps(cfg, proc, parts, progress, train_data, test_data, outputs, phases, stop, meter, bar)
    except WriteError as err:
        faces = (len(train_data), len(test_data))
        save_now = (lambda: save_checkpoint(cfg, proc, parts, progress, outputs, phases, faces)) \
            if proc.world == 1 else None  # saving is a collective: the other ranks would wait for it
        raise stopped_writing(err, outputs, progress.step, stop.signum, save_now) from None
    finally:
        bar.close()
    return signum


def run_steps(cfg, proc: Proc, parts: Parts, progress: Progress, train_data: torch.Tensor, test_data: torch.Tensor,
              outputs: RunOutputs | None, phases: Phases, stop: "Stop", meter: "Meter", bar: tqdm) -> int:
    steps_per_epoch = len(train_data) // proc.world // cfg.train.batch_size
    images_per_step = cfg.train.batch_size * proc.world
    ckpt_path = outputs.ckpt_path if outputs else Path(os.devnull)
    autocast = torch.autocast(proc.device.type if proc.bf16 else "cpu", dtype=torch.bfloat16, enabled=proc.bf16)
    last_good_step, order, order_epoch, signum = progress.step, None, -1, 0
    idle_vae, idle_sharp = torch.zeros(3, device=proc.device), torch.zeros(len(SHARP_FIELDS), device=proc.device)
    while progress.step < phases.total:
        # the batch: this rank's shard of the epoch's permutation
        epoch, batch_no = divmod(progress.step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(train_data), epoch, cfg.seed, proc), epoch
        x = next_batch(cfg, train_data, order, batch_no, proc.device)

        vae_values = vae_step(cfg, parts, x, autocast, progress.step) if phases.trains_vae(progress.step) \
            else idle_vae
        sharp_values = parts.start_sharp(cfg, proc.rank).step(x, autocast, proc.world) \
            if phases.trains_sharp(progress.step) else idle_sharp
        meter.add(progress.step, torch.cat([vae_values, sharp_values]))
        progress.step += 1
        bar.update()
        if proc.free_cores:
            proc.free_cores.update()

        # metrics every log_every steps and where a phase starts; test ELBO and grids every eval_every epochs
        # and at each phase's end
        step, last = progress.step, progress.step in (phases.vae_steps, phases.sharp_end)
        evaluate_now = last or (step % steps_per_epoch == 0 and step // steps_per_epoch % cfg.train.eval_every == 0)
        if step % cfg.train.log_every == 0 or evaluate_now or step == phases.sharp_start:
            meter.check_finite(ckpt_path, last_good_step)
            log_row(cfg, outputs, parts, meter, progress, phases, test_data, steps_per_epoch, images_per_step,
                    evaluate_now, bar)

        # checkpoint: every ckpt_every steps, the last step, and on a stop signal
        signum = stop.agreed(proc)
        if step % cfg.train.ckpt_every == 0 or last or signum:
            meter.check_finite(ckpt_path, last_good_step)
            save_checkpoint(cfg, proc, parts, progress, outputs, phases, (len(train_data), len(test_data)))
            last_good_step = step
        if signum:
            break
    return signum


def save_checkpoint(cfg, proc: Proc, parts: Parts, progress: Progress, outputs: RunOutputs | None, phases: Phases,
                    faces: tuple[int, int]) -> None:
    rngs = rng_states(proc, parts.sharp)  # a collective: every rank takes part
    if outputs:
        steps_per_epoch = faces[0] // proc.world // cfg.train.batch_size
        outputs.save_checkpoint(checkpoint_state(cfg, parts, progress, rngs, steps_per_epoch, phases.vae_steps,
                                                 faces))


# ---------------------------------------------------------------- all phases

def train(cfg: DictConfig, run_dir: Path | None = None) -> dict:
    check_objective(cfg)
    check_sharp(cfg)
    proc = setup_processes(cfg)
    train_np, test_np = load_splits(cfg, proc)
    steps_per_epoch = len(train_np) // proc.world // cfg.train.batch_size
    vae_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    phases = sharp_phases(cfg, vae_steps, steps_per_epoch)
    parts = build(cfg, train_np.shape[-1], proc, vae_steps)
    torch.manual_seed(cfg.seed + proc.rank)  # per-rank noise for flips and the reparameterisation
    resume_path = broadcast(resolve_resume(cfg) if proc.main else None, proc)
    progress = restore_checkpoint(cfg, resume_path, parts, proc) if resume_path else Progress()
    if parts.sharp is None and phases.sharp_start < min(progress.step, phases.sharp_end):
        raise TrainError(f"sharp.joint_from={phases.sharp_start} is before step {progress.step}, where {resume_path} "
                         "resumes: the sharp decoder would miss its first steps; use a later step, or null")
    wrap(cfg, parts, proc)
    run_dir, outputs = open_outputs(cfg, proc, resume_path, run_dir, progress.step)
    if outputs:
        log_start(cfg, run_dir, proc, train_np, test_np, phases, steps_per_epoch, parts.core)
    train_data, test_data = torch.from_numpy(train_np).to(proc.device), torch.from_numpy(test_np).to(proc.device)
    start_step, t0 = progress.step, time.perf_counter()
    try:
        signum = train_loop(cfg, proc, parts, progress, train_data, test_data, outputs, phases)
        if outputs:
            store_prior_or_explain(cfg, parts.sampler, train_np, min(progress.step, vae_steps), outputs, progress)
    except BaseException:
        if outputs:
            outputs.close(failing=True)
        raise
    if outputs:
        outputs.close()
    if signum:
        if outputs:
            log.warning("stopped by signal %d at step %d; checkpoint %s; resume with: "
                        "python -m pipeline.train resume=%s", signum, progress.step, outputs.ckpt_path, run_dir)
        raise SystemExit(128 + signum)
    summary = {"run_dir": str(run_dir), "steps": progress.step, "epochs": progress.step / steps_per_epoch,
               "img_per_s": (progress.step - start_step) * cfg.train.batch_size * proc.world
               / max(time.perf_counter() - t0, 1e-9),
               "best_test_elbo": progress.best_test_elbo}
    if outputs:
        log.info("done: %d steps, %.2f epochs, %.0f img/s, best test ELBO %.1f nats/image (%.3f bits/dim) -> %s",
                 progress.step, summary["epochs"], summary["img_per_s"], progress.best_test_elbo,
                 bits_per_dim(-progress.best_test_elbo, train_np[0].size), outputs.ckpt_path)
    return summary


def store_prior_or_explain(cfg, model: VAE, train_np: np.ndarray, encoder_step: int, outputs: RunOutputs,
                           progress: Progress) -> None:
    try:
        store_prior(cfg, model, train_np, encoder_step, outputs.run_dir)
    except WriteError as err:
        raise prior_not_stored(err, outputs, progress.step) from None


def store_prior(cfg, model: VAE, train_np: np.ndarray, encoder_step: int, run_dir: Path) -> None:
    """Fit the sampling prior to the training codes of the encoder at `encoder_step` (the sharp decoder's
    phase leaves it as it is) and store it beside ckpt.pt, with what sampling by hair colour needs."""
    prior, hair = load_prior(run_dir), load_hair(run_dir)
    if prior is not None and prior["step"] == encoder_step and hair is not None and hair["step"] == encoder_step:
        return
    codes = encode_means(model, train_np)
    if prior is None or prior["step"] != encoder_step:
        prior = fit_gmm_prior(model, train_np, cfg.train.prior_components, cfg.seed, encoder_step, codes)
        log.info("sampling prior (%d-component mixture over the training codes) -> %s", prior["components"],
                 save_prior(run_dir, prior))
    log.info("hair colours -> %s", save_hair(run_dir, hair_for_run(codes, train_np, encoder_step)))


def log_start(cfg, run_dir, proc, train_np, test_np, phases: Phases, steps_per_epoch, model) -> None:
    if cfg.train.kl_warmup_steps:
        log.info("KL warmup: the KL term's weight rises from 0 to beta over the first %d steps (the loss is the "
                 "ELBO only after that)", cfg.train.kl_warmup_steps)
    if cfg.beta != 1:
        log.warning("beta=%s: the loss is NOT the ELBO (KL weighted by %s); reported ELBOs use beta=1",
                    cfg.beta, cfg.beta)
    log.info("run dir %s; %d train / %d test faces %s on %s x %d; %d steps (%d per epoch), model %.2fM params",
             run_dir, len(train_np), len(test_np), tuple(train_np.shape[1:]), proc.device, proc.world,
             phases.total, steps_per_epoch, sum(p.numel() for p in model.parameters()) / 1e6)
    log.info("phases: %s", phases)


def resolve_preset(cfg: DictConfig) -> DictConfig:
    """preset=auto becomes preset=gpu on a CUDA device and preset=cpu elsewhere, composed again with the
    same command-line overrides, so that keys given there still win over the preset's."""
    if cfg.get("preset_name", "auto") != "auto":
        return cfg
    name = "gpu" if pick_device(str(cfg.device), dist_env()[2]).type == "cuda" else "cpu"
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("preset=")]
    return compose(config_name="train", overrides=[*overrides, f"preset={name}"])


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
@exit_on_error
def main(cfg: DictConfig) -> None:
    cfg = checked(resolve_preset(cfg), TrainJob)
    if cfg.resume is not None:
        cfg, changed, step = resume_config(cfg, TrainJob)
        if dist_env()[0] == 0:
            record_resume(Path(cfg.resume).parent, step, changed)
    else:
        chosen = "" if "preset" in command_line_keys() else " (chosen from the device)"
        log.info("preset: %s%s", cfg.preset_name, chosen)
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if cfg.resume is not None and dist_env()[0] == 0:
            keep_log_in_run(Path(cfg.resume).parent)


def keep_log_in_run(run_dir: Path) -> None:
    """A resumed run writes into its own folder: Hydra's new folder keeps nothing but the log, which is
    appended to the run's train.log, and is removed."""
    hydra_dir = hydra_output_dir()
    if hydra_dir is None or hydra_dir.resolve() == run_dir.resolve():
        return
    for handler in logging.getLogger().handlers:
        handler.flush()
    try:
        with AppendOnly(run_dir / "train.log") as kept:
            for log_file in hydra_dir.glob("*.log"):
                kept.add(log_file.read_text())
    except WriteError as err:  # the log stays in Hydra's folder then
        log.warning("%s: this command's log is left in %s", err, hydra_dir)
        return
    remove_if_no_results(hydra_dir)


if __name__ == "__main__":
    if dist_env()[0] > 0:  # only rank 0 writes a Hydra run folder and log file
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=."]
    main()
