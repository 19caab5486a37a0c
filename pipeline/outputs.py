"""A training run's folder, as rank 0 writes it (pipeline/train.py: phase 5): config.yaml, metrics.csv, TensorBoard
events, per-epoch grids and ckpt.pt; and what a write of them that fails (a full disk, a read-only folder) costs: the
one line that says which checkpoint is intact, how many steps were lost and the command that resumes."""
import csv
import io
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image

from pipeline.adversarial import SHARP_FIELDS
from pipeline.errors import PipelineError, WriteError
from pipeline.io import AppendOnly, atomic_write, atomic_write_bytes, writing
from pipeline.model import VAE, decode_means, recon_grid
from pipeline.runs import CKPT_NAME

METRIC_FIELDS = ["step", "epoch", "loss", "nll", "kl", "lr", "img_per_s", "test_elbo", "test_nll",
                 "test_kl", "test_bpd", *SHARP_FIELDS]


class RunOutputs:
    """The run folder: config.yaml, metrics.csv, TensorBoard events, per-epoch grids and ckpt.pt. Every write goes
    through pipeline/io.py, so one that fails (a full disk) is a WriteError naming its file; train.py then stops
    the run (stopped_writing)."""

    def __init__(self, cfg, run_dir: Path, resumed_step: int | None):
        self.cfg, self.run_dir = cfg, run_dir
        self.ckpt_path = run_dir / CKPT_NAME
        self.saved_step = resumed_step  # the step of the checkpoint on disk
        with writing(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(f".{CKPT_NAME}.*.part"):  # left by a save that was killed
            stale.unlink()
        if resumed_step is None:
            claim_run_dir(run_dir)
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
        with writing(run_dir / "tb"):
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resumed_step)
        if resumed_step is not None:
            drop_rows_after(run_dir / "metrics.csv", resumed_step)
        new_file = not (run_dir / "metrics.csv").exists()
        self.metrics = AppendOnly(run_dir / "metrics.csv")
        if new_file:
            self.metrics.add(csv_lines([dict(zip(METRIC_FIELDS, METRIC_FIELDS))]))

    def write_row(self, row: dict) -> None:
        self.metrics.add(csv_lines([row]))
        with writing(self.run_dir / "tb"):
            for name, value in row.items():
                if name != "step":
                    self.writer.add_scalar(name, value, row["step"])

    def save_grids(self, model: VAE, test: torch.Tensor, epoch: int, prefix: str = "") -> None:
        """Decoder means of fixed N(0, I) draws, and test faces above their reconstructions."""
        n = self.cfg.train.grid_n
        generator = torch.Generator(device=test.device).manual_seed(0)
        z = torch.randn(n, model.latent_dim, generator=generator, device=test.device)
        save_png(decode_means(model, z), self.run_dir / f"{prefix}samples_epoch{epoch:03d}.png")
        save_png(recon_grid(model, test[: n // 2], 8), self.run_dir / f"{prefix}recon_epoch{epoch:03d}.png")

    def save_checkpoint(self, state: dict) -> None:
        atomic_write(self.ckpt_path, lambda f: torch.save(state, f))
        self.saved_step = state["step"]

    def close(self, failing: bool = False) -> None:
        """Flush the TensorBoard events and close the files; when the run is already `failing`, a second failed
        write here is not reported over the first."""
        try:
            with writing(self.run_dir / "tb"):
                self.writer.close()
        except WriteError:
            if not failing:
                raise
        finally:
            self.metrics.close()


def save_png(images: torch.Tensor, path: Path) -> None:
    atomic_write(path, lambda f: save_image(images, f, format="png", nrow=8))


def csv_lines(rows: list[dict]) -> str:
    text = io.StringIO()
    csv.DictWriter(text, METRIC_FIELDS, lineterminator="\n").writerows(rows)
    return text.getvalue()


def claim_run_dir(run_dir: Path) -> None:
    """A new run takes its folder exclusively (config.yaml created with O_EXCL)."""
    with writing(run_dir / "config.yaml"):
        try:
            open(run_dir / "config.yaml", "x").close()
        except FileExistsError:
            raise PipelineError(f"{run_dir} already holds a run (its config.yaml exists): each training needs its "
                                "own folder; leave hydra.run.dir at its default, or resume=<that folder> to continue "
                                "it") from None


def drop_rows_after(metrics_csv: Path, step: int) -> None:
    """Rows logged after the checkpoint a run resumes from are logged again: keep no repeated step (and write
    today's header: files from before the sharp decoder's columns keep their rows)."""
    if metrics_csv.exists():
        lines = metrics_csv.read_text().splitlines(keepends=True)
        kept = [line for line in lines[1:] if line.endswith("\n") and
                line.split(",", 1)[0].isdigit() and int(line.split(",", 1)[0]) <= step]
        text = csv_lines([dict(zip(METRIC_FIELDS, METRIC_FIELDS)), *csv.DictReader(lines[:1] + kept)])
        atomic_write_bytes(metrics_csv, text.encode())


def stopped_writing(err: WriteError, outputs: RunOutputs | None, step: int, signum: int,
                    save_now: Callable[[], None] | None) -> WriteError:
    """A write that failed stops the run, whatever the file: a disk that refuses a grid or a metrics row would refuse
    the next checkpoint too, and every step until then would be lost. Where it can (`save_now`, one process), a
    checkpoint is saved first when the failed file was not the checkpoint. The error says what was kept and the
    command that resumes."""
    if outputs is None:  # another rank: rank 0 reports it
        return err
    ckpt = outputs.ckpt_path
    stopped = f"the run stopped at step {step}" + (f" (signal {signum})" if signum else "")
    resume = f"resume with: python -m pipeline.train resume={outputs.run_dir}"
    if Path(err.path) != ckpt and save_now is not None:
        try:
            save_now()
            return err.going_on(f"{stopped} and saved its checkpoint {ckpt} there first (nothing is lost); once "
                                f"that is fixed, {resume}")
        except WriteError:
            stopped += " and could not save its checkpoint there either"
    saved = outputs.saved_step
    if saved is None:
        return err.going_on(f"{stopped} before its first checkpoint was written ({steps(step)} lost); once that is "
                            "fixed, start the training again")
    return err.going_on(f"{stopped}; its last checkpoint {ckpt} (step {saved}) is intact and {steps(step - saved)} "
                        f"since were lost; once that is fixed, {resume}")


def prior_not_stored(err: WriteError, outputs: RunOutputs, step: int) -> WriteError:
    return err.going_on(f"the run's checkpoint {outputs.ckpt_path} (step {step}) is saved, but not what sampling "
                        f"needs beside it; once that is fixed, python -m pipeline.train resume={outputs.run_dir} "
                        "stores it (no step is trained again)")


def steps(n: int) -> str:
    return f"{n} step" + ("" if n == 1 else "s")
