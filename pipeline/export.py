"""Stage 7: a trained run as a folder you can hand to someone (`make export`).

    python -m pipeline.export +obs_std=0.1 out=DIR      # the newest obs_std=0.1 run (ckpt= as in pipeline.sample)

DIR gets model.safetensors (every decoder the run has), prior.safetensors (its stored mixture), config.json,
README.md (a model card), samples.png and the detector's cascade (uploads in the explorer work where the
folder goes); nothing in it is pickled (pipeline/bundle.py). Every stage that takes ckpt= takes DIR, and so
does `pipeline.load(DIR)`. The folder is written beside DIR and renamed into place: it is whole or not
there, and exporting the same run twice gives the same bytes.
"""
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from pipeline.adversarial import decoder_state
from pipeline.bundle import (CARD_FILE, CASCADE_FILE, CONFIG_FILE, GRID_FILE, MODEL_FILE, PRIOR_FILE, SLIDERS_FILE,
                             WEB_FOLDER, config_bytes, model_bytes, prior_bytes)
from pipeline.config import Paths, checked, key
from pipeline.errors import DataError, PipelineError, exit_on_error
from pipeline.faces import DetectorConfig, load_cascade, only_detector_keys, resolve_cascade
from pipeline.io import after_write_error, check_destination, writing
from pipeline.model import bits_per_dim, model_settings
from pipeline.prior import sample_latents
from pipeline.runs import Run, open_run
from pipeline.web import WebConfig, web_files

log = logging.getLogger(__name__)


@dataclass
class ExportJob:
    """conf/export.yaml's keys (obs_std is appended with +obs_std=..., as for pipeline.sample)."""
    paths: Paths = key(default=Paths)
    crop: DetectorConfig = key(default=DetectorConfig)
    ckpt: str | None = key()
    out: str | None = key()
    overwrite: bool = key()
    cascade: bool = key()
    grid: int = key(low=1, high=256)
    nrow: int = key(low=1)
    seed: int = key(low=0)
    device: str = key()
    web: WebConfig = key(default=WebConfig)
    obs_std: float | None = key(low=1e-6, default=None)


def destination(cfg, run: Run) -> Path:
    """out=, or outputs/export/<run folder>; an existing non-empty folder only with overwrite=true."""
    out = Path(cfg.out) if cfg.out else Path(cfg.paths.output_dir) / "export" / run.ckpt_path.parent.name
    check_destination("out", out, folder=True)
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise PipelineError(f"out={out} exists and is not empty: choose another out=, or add overwrite=true to "
                            "replace it")
    if out.resolve() in (run.ckpt_path.parent.resolve(), *run.ckpt_path.parent.resolve().parents):
        raise PipelineError(f"out={out} holds the run being exported ({run.ckpt_path.parent}): choose another out=")
    return out


def project_version() -> str:
    try:
        return version("animeface-vae")
    except PackageNotFoundError:
        return "unknown"


# what a path on the trainer's machine becomes in a folder handed to others
PATH_PLACEHOLDERS = {"paths.data_dir": "DATA_DIR", "paths.output_dir": "OUTPUT_DIR", "resume": "RUN_FOLDER"}


def training_command(run_dir: Path) -> str:
    """The command line that trained the run (Hydra's record of its overrides)."""
    overrides = run_dir / ".hydra" / "overrides.yaml"
    args = list(OmegaConf.load(overrides)) if overrides.is_file() else []
    return " ".join(["python -m pipeline.train", *map(str, args)])


def without_local_path(override: str) -> str:
    """`key=value` with a path value replaced by a placeholder (DATA_DIR, ..., or PATH for any other key)."""
    name, sep, value = override.partition("=")
    is_path = name.lstrip("+~").startswith("paths.") or "/" in value or "\\" in value or value.startswith("~")
    if not sep or not is_path or value.startswith("["):
        return override
    return f"{name}={PATH_PLACEHOLDERS.get(name.lstrip('+~'), 'PATH')}"


def public_training(training: dict) -> dict:
    """The record of a run's training with every local path in its command replaced (a run's, or an export's
    exported again: one written before the paths were replaced)."""
    command = training.get("command")
    return training if command is None else {**training, "command": " ".join(map(without_local_path,
                                                                                   command.split(" ")))}


def data_summary(run: Run) -> dict:
    """The split file names (a loader looks for them in its own data folder) and what splits.json says."""
    train_file, test_file = Path(run.config["train"]["train_file"]), Path(run.config["train"]["test_file"])
    summary = {"train_file": train_file.name, "test_file": test_file.name}
    try:
        splits = run.split_path("train").parent / "splits.json"
    except DataError:  # another data set under paths.data_dir: the card says what the run recorded
        splits = train_file.parent / "splits.json"
    if not run.exported and splits.is_file():
        try:
            recorded = json.loads(splits.read_text(encoding="utf-8"))
        except ValueError as err:
            log.warning("%s is not readable JSON (%s): the model card leaves out what it says", splits, err)
            recorded = {}
        summary.update({k: v for k, v in recorded.items() if not isinstance(v, (list, dict))})
    elif run.exported:
        summary.update({k: v for k, v in run.ckpt["export"]["data"].items() if k not in summary})
    if summary.get("faces_dir"):
        summary["faces_dir"] = Path(summary["faces_dir"]).name  # the folder's name, not where it was on disk
    return summary


def evaluated(run: Run) -> dict | None:
    """The FID/KID rows of the run's metrics.json, when it was evaluated at the step exported."""
    path = run.ckpt_path.parent / "metrics.json"
    if run.exported:
        return run.ckpt["export"].get("metrics")
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text(encoding="utf-8"))
    if metrics.get("step") != run.ckpt["step"]:
        log.warning("%s scores step %s, not the exported step %s: left out of the card (run `make eval` again)",
                    path, metrics.get("step"), run.ckpt["step"])
        return None
    rows = {"elbo": metrics.get("priors", {}), "sharp": metrics.get("sharp_priors", {})}
    keep = ("fid", "kid", "sharpness_ratio", "memorisation_ratio", "near_copies", "reference")
    return {"n": metrics["n"], "floor_fid": metrics["floor_train_vs_test"]["fid"],
            "reference": Path(metrics["reference"]["path"]).name if "reference" in metrics else None,
            "rows": {d: {p: {k: v for k, v in s.items() if k in keep} for p, s in r.items()}
                     for d, r in rows.items() if r}}


def export_config(run: Run, prior: dict, hair: dict) -> dict:
    ckpt, model = run.ckpt, run.elbo_model
    test_elbo = ckpt.get("best_test_elbo")
    source = ckpt["export"] if run.exported else {}
    return {
        "model_args": model_settings(ckpt["model_args"]), "obs_std": run.obs_std, "likelihood": run.likelihood,
        "image_size": model.image_size, "latent_dim": model.latent_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
        "decoders": ["elbo", *(["sharp"] if run.sharp_model is not None else [])],
        "default_decoder": "sharp" if run.sharp_model is not None else "elbo",
        "sharp_decoder_width": ckpt["sharp"].get("decoder_width") if "sharp" in ckpt else None,
        "step": ckpt["step"], "encoder_step": run.encoder_step, "vae_steps": ckpt.get("vae_steps", run.encoder_step),
        "test_elbo": test_elbo,
        "test_bpd": None if test_elbo is None else bits_per_dim(-test_elbo, 3 * model.image_size ** 2),
        "prior": {k: prior[k] for k in ("kind", "components", "codes", "seed") if k in prior},
        "hair": {"offered": {name: c["faces"] for name, c in hair["colours"].items()},
                 "not_offered": hair["not_offered"]} if hair else {"offered": {}, "not_offered": {}},
        "training": public_training(source.get("training") or {
            "command": training_command(run.ckpt_path.parent), "preset": run.config.get("preset_name"),
            "batch_size": run.config["train"].get("batch_size"), "run": run.ckpt_path.parent.name}),
        "data": data_summary(run), "metrics": evaluated(run), "project": f"animeface-vae {project_version()}",
    }


def grid_png(run: Run, cfg, prior: dict) -> bytes:
    """What `python -m pipeline.sample` draws with the same seed (stored prior, the default decoder)."""
    z = sample_latents(prior, cfg.grid, run.model.latent_dim, torch.Generator().manual_seed(cfg.seed))
    buffer = io.BytesIO()
    save_image(run.decode(z), buffer, format="png", nrow=cfg.nrow)
    return buffer.getvalue()


def cascade_bytes(cfg, run: Run) -> bytes | None:
    """The detector's cascade, found as the explorer finds it (an export being exported again has its own)."""
    if not cfg.cascade:
        return None
    try:
        path = resolve_cascade(cfg.crop, [run.cascade_copy] if run.cascade_copy else [])
    except PipelineError as err:
        raise PipelineError(f"{err}; or add cascade=false to export without the detector (uploads then need "
                            "crop.cascade where the folder goes)") from None
    load_cascade(path)
    return path.read_bytes()


def export_files(cfg, run: Run) -> dict[str, bytes]:
    prior, _ = run.prior("default", 100, cfg.seed)
    try:
        hair = run.hair()
    except DataError as err:
        log.warning("%s: exported without hair colours", err)
        hair = None
    config = export_config(run, prior, hair)
    sharp = decoder_state(run.sharp_model) if run.sharp_model is not None else None
    cascade = cascade_bytes(cfg, run)
    files = {MODEL_FILE: model_bytes(run.elbo_model.state_dict(), sharp), PRIOR_FILE: prior_bytes(prior, hair),
             CONFIG_FILE: config_bytes(config), GRID_FILE: grid_png(run, cfg, prior),
             CARD_FILE: model_card(config, cascade is not None, cfg.web.enabled).encode()}
    if cascade is not None:
        files[CASCADE_FILE] = cascade
    sliders = run.ckpt_path.parent / SLIDERS_FILE
    if sliders.is_file():
        files[SLIDERS_FILE] = sliders.read_bytes()
    if cfg.web.enabled:
        about = {"obs_std": run.obs_std, "step": run.ckpt["step"], "decoder": run.decoder_name,
                 "parameters": config["parameters"], "test_elbo": config["test_elbo"]}
        web = web_files(cfg.web, run.model, prior, hair, run.sliders()[0], about, cfg.crop, cascade)
        files.update({f"{WEB_FOLDER}/{name}": data for name, data in web.items()})
    return files


def write_folder(out: Path, files: dict[str, bytes]) -> None:
    """All files into a temp folder beside `out`, then one rename (the old folder goes only after): a failed write
    leaves `out` as it was and no temp folder behind."""
    for stale in [*out.parent.glob(f".{out.name}.*.part"), out.with_name(f".{out.name}.old")]:  # a killed export's
        shutil.rmtree(stale, ignore_errors=True)
    with writing(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would keep the folder from whoever it is handed to
        for name, data in files.items():
            with writing(out / name):
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
        with writing(out):
            old = out.with_name(f".{out.name}.old") if out.exists() else None
            if old:
                os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                if old:
                    os.replace(old, out)
                raise
            if old:
                shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(cfg: DictConfig) -> Path:
    run = open_run(cfg)
    out = destination(cfg, run)
    write_folder(out, export_files(cfg, run))
    log.info("exported %s (obs_std=%g, step %d, decoders %s) -> %s", run.ckpt_path, run.obs_std,
             run.ckpt["step"], "+".join(["elbo", *(["sharp"] if run.sharp_model is not None else [])]), out)
    return out


def metric_lines(metrics: dict | None) -> list[str]:
    if not metrics:
        return ["Not evaluated at this step: `make eval` before exporting adds FID, KID, sharpness and "
                "memorisation here."]
    lines = [f"{metrics['n']} samples per row against the test split (real-vs-real floor FID "
             f"{metrics['floor_fid']:.1f}); near-copies: samples closer to a training face than 99% of test faces.", "",
             "| decoder | prior | FID | KID x1e3 | sharpness vs real | memorisation | near-copies | reference FID |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for decoder, rows in metrics["rows"].items():
        for prior, s in rows.items():
            ref = f"{s['reference']['fid']:.1f}" if "reference" in s else "-"
            near = f"{100 * s['near_copies']:.1f}%" if "near_copies" in s else "-"
            lines.append(f"| {decoder} | {prior} | {s['fid']:.1f} | {1e3 * s['kid']:.1f} | "
                         f"{s['sharpness_ratio']:.2f} | {s['memorisation_ratio']:.2f} | {near} | {ref} |")
    return lines


def model_card(config: dict, has_cascade: bool, has_web: bool) -> str:
    """README.md of the export: what it is, how it was trained, how good it is, how to use it."""
    data, train = config["data"], config["training"]
    decoders = ("the exact-ELBO decoder (`decoder=elbo`) and a sharp decoder for the same codes (the default "
                "for sampling), fine-tuned with a patch discriminator after the VAE"
                if "sharp" in config["decoders"] else "the exact-ELBO decoder")
    elbo = (f"{config['test_elbo']:.1f} nats per image ({config['test_bpd']:.3f} bits/dim)"
            if config["test_elbo"] is not None else "not recorded")
    faces = (f"{data['train']} training and {data['test']} test faces from `{data.get('faces_dir')}` "
             f"({data.get('files')} files, {data.get('exact_duplicates')} exact duplicates dropped)"
             if "train" in data else "the packed splits `train.npy` / `test.npy`")
    lines = [
        "---", "license: mit", "library_name: pytorch", "tags: [vae, anime, faces, image-generation, animeface-vae]",
        "---", "", f"# animeface-vae: a VAE of {config['image_size']}x{config['image_size']} anime faces, "
        f"obs_std={config['obs_std']:g}", "",
        f"A convolutional VAE with a {config['likelihood']} likelihood p(x|z) of std obs_std={config['obs_std']:g} "
        f"on [0, 1] pixels, trained on the exact ELBO (no KL weight), {config['latent_dim']}-dimensional codes, "
        f"{config['parameters'] / 1e6:.2f}M parameters. Decoders: {decoders}. Codes are drawn from the stored "
        f"prior: a {config['prior'].get('components')}-component Gaussian mixture fitted to the training codes.", "",
        "Hair colours you can ask for (`hair=<colour>`; the training faces of each, as pipeline/hair.py labels "
        f"them): {', '.join(f'{k} ({v})' for k, v in config['hair']['offered'].items()) or 'none'}"
        + "".join(f"; {k}: not offered, {why}" for k, why in config["hair"]["not_offered"].items()) + ".", "",
        f"![{GRID_FILE}]({GRID_FILE})", "", "## Training", "",
        f"`{train['command']}` ({config['step']} steps, the VAE's {config['vae_steps']}; preset "
        f"{train.get('preset')}, batch {train.get('batch_size')}), {config['project']}.", "",
        "## Data", "",
        f"{faces}. The faces are character art from Getchu product pages, cropped with the lbpcascade_animeface "
        "detector (https://github.com/nagadomi/lbpcascade_animeface) into square tiles, deduplicated and split "
        "by `make data`. The pictures belong to their publishers: for research and personal use.", "",
        "## Quality", "", f"Test ELBO: {elbo}.", "", *metric_lines(config["metrics"]), "",
        *usage_lines(has_cascade, has_web)]
    return "\n".join(lines) + "\n"


def usage_lines(has_cascade: bool, has_web: bool) -> list[str]:
    upload = ("The folder carries the detector's cascade: uploads in the explorer work offline."
              if has_cascade else "Exported without the detector's cascade: for uploads in the explorer pass "
              "crop.cascade=/path/to/lbpcascade_animeface.xml.")
    web = ([f"Without Python: `{WEB_FOLDER}/` is a static web page that draws faces in the browser" +
            (", and finds, encodes and edits the faces of a visitor's own picture there (the picture is never sent "
             "anywhere)" if has_cascade else "") + ". Publish it on any "
            f"static host, or `python -m http.server -d {WEB_FOLDER} 8000` and open http://localhost:8000/.", ""]
           if has_web else [])
    return ["## Use", "", *web, "With the animeface-vae code installed (`make install`, or `pip install -e .`, in its "
            "clone):", "",
            "```", "python -m pipeline.sample ckpt=THIS_FOLDER            # a grid, like samples.png",
            "python -m pipeline.explore ckpt=THIS_FOLDER           # sample, steer and encode in the browser",
            "python -m pipeline.evaluate ckpt=THIS_FOLDER paths.data_dir=DATA  # needs the packed splits", "```", "",
            "```python", "from pipeline import load", 'model = load("THIS_FOLDER")',
            "faces = model.sample(16, seed=0)   # uint8 16 x 64 x 64 x 3", "```", "", upload, "",
            "## Files", "", f"`{MODEL_FILE}` (the VAE's tensors; `sharp.*` the sharp decoder's), `{PRIOR_FILE}` "
            f"(the mixture: weights, means, cholesky), `{CONFIG_FILE}`, `{GRID_FILE}`"
            + (f", `{CASCADE_FILE}`" if has_cascade else "")
            + (f", `{WEB_FOLDER}/` (the page, its decoder as ONNX, the mixture packed for it, ONNX Runtime Web)"
               if has_web else "") + ". Nothing is pickled."]


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
@exit_on_error
def main(cfg: DictConfig) -> None:
    with after_write_error("out= is as it was (the export is written beside it and renamed into place whole) and no "
                           "partial folder is left; once that is fixed, run the same command again (with "
                           "overwrite=true if out= existed)"):
        print(export(checked(only_detector_keys(cfg), ExportJob)))


if __name__ == "__main__":
    main()
