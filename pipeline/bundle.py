"""The export folder's format (written by pipeline.export, read by every stage through pipeline.runs):
safetensors weights and prior, a config.json, nothing pickled.

    model.safetensors   the VAE's state dict as the VAE names it (the weights that sample: the moving
                        average when the run kept one), plus "sharp.<name>" for the sharp decoder's tensors
    prior.safetensors   the stored sampling prior (weights, means, cholesky; its fit in the metadata) and
                        per hair colour its own Gaussian and the direction towards it
    sliders.json        the sliders made in the explorer, as the run folder keeps them
    config.json         what the model is and how it was trained (format EXPORT_FORMAT)
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from pipeline.attributes import checked_hair
from pipeline.errors import RunNotFound
from pipeline.model import VAE
from pipeline.prior import checked_mixture
from pipeline.stored import require_finite

EXPORT_FORMAT = "animeface-vae-export/1"
MODEL_FILE, PRIOR_FILE, CONFIG_FILE = "model.safetensors", "prior.safetensors", "config.json"
CARD_FILE, GRID_FILE, CASCADE_FILE = "README.md", "samples.png", "lbpcascade_animeface.xml"
SLIDERS_FILE, WEB_FOLDER = "sliders.json", "web"
SHARP_PREFIX = "sharp."
PRIOR_TENSORS = ("weights", "means", "cholesky")
PRIOR_FIELDS = ("kind", "components", "codes", "seed", "step")
HAIR_TENSORS = ("mean", "cholesky", "direction")


def is_export(folder) -> bool:
    return (Path(folder) / MODEL_FILE).is_file() and (Path(folder) / CONFIG_FILE).is_file()


def model_bytes(elbo_state: dict, sharp_state: dict | None) -> bytes:
    tensors = {**elbo_state, **{SHARP_PREFIX + k: v for k, v in (sharp_state or {}).items()}}
    return save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
                metadata={"format": EXPORT_FORMAT})


def prior_bytes(prior: dict, hair: dict | None) -> bytes:
    """The mixture's tensors, and per offered hair colour "hair.<colour>.mean" / ".cholesky" / ".direction"."""
    fit = {k: prior[k] for k in PRIOR_FIELDS if prior.get(k) is not None}
    tensors = {k: prior[k] for k in PRIOR_TENSORS}
    if hair is not None:
        fit["hair"] = {"step": hair["step"], "faces": hair["faces"], "not_offered": hair["not_offered"],
                       "colours": {name: c["faces"] for name, c in hair["colours"].items()}}
        tensors.update({f"hair.{name}.{k}": c[k] for name, c in hair["colours"].items() for k in HAIR_TENSORS})
    # one metadata entry: safetensors writes several in no fixed order, and an export must be the same bytes
    return save({k: v.contiguous().clone() for k, v in tensors.items()},
                metadata={"fit": json.dumps(fit, sort_keys=True)})


def config_bytes(config: dict) -> bytes:
    return (json.dumps({"format": EXPORT_FORMAT, **config}, indent=2, sort_keys=True, ensure_ascii=False)
            + "\n").encode()


# What config.json must hold, field by field. An export is a file from a stranger: exact JSON types (no
# coercion of "0.1" or of "${...}" as Hydra's configs would), sizes bounded, checked before anything is built.
class Misfit(Exception):
    """One field of a JSON document that is not what the pipeline writes (`field`: its dotted name)."""

    def __init__(self, field: str, expected: str | None, value=None):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        super().__init__(f"{field} is missing" if expected is None else f"{field} is {shown}, not {expected}")


def whole(low: int, high: int):
    def check(value, field):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise Misfit(field, f"a whole number from {low} to {high}", value)
    return check


def number(low: float, high: float):
    def check(value, field):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise Misfit(field, f"a number from {low:g} to {high:g}", value)
    return check


def text(*choices: str):
    def check(value, field):
        if not isinstance(value, str) or choices and value not in choices:
            raise Misfit(field, f"one of {', '.join(choices)}" if choices else "text", value)
    return check


def file_name(value, field):
    if not isinstance(value, str) or not value.endswith(".npy") or Path(value).name != value or value.startswith("."):
        raise Misfit(field, "a file name ending in .npy (no folder: the loader's data folder holds it)", value)


def optional(spec):
    return lambda value, field: None if value is None else spec(value, field)


def each(spec, words: str = "a list"):
    def check(value, field):
        if not isinstance(value, list):
            raise Misfit(field, words, value)
        for i, item in enumerate(value):
            spec(item, f"{field}[{i}]")
    return check


def mapping(spec):
    """An object whose every value fits `spec`."""
    def check(value, field):
        if not isinstance(value, dict):
            raise Misfit(field, "an object", value)
        for name, item in value.items():
            spec(item, f"{field}.{name}")
    return check


def record(required: dict, optional_fields: dict | None = None):
    """An object with these fields (others are never read); `required` ones present."""
    def check(value, field):
        if not isinstance(value, dict):
            raise Misfit(field, "an object", value)
        for name, spec in {**required, **(optional_fields or {})}.items():
            if name in value:
                spec(value[name], f"{field}.{name}".lstrip("."))
            elif name in required:
                raise Misfit(f"{field}.{name}".lstrip("."), None)
    return check


SIZE = whole(1, 2 ** 16)  # bounds only the arithmetic: the weights' shapes are compared before anything is built
COUNT = whole(0, 2 ** 53)
SCORE = number(-1e12, 1e12)
MODEL_ARGS = record({"image_size": whole(4, 4096), "width": SIZE, "depth": whole(1, 8), "latent_dim": SIZE,
                     "max_channels": SIZE, "decoder_width": optional(SIZE), "res_blocks": whole(0, 64),
                     "upsample": text("transposed", "nearest")})
SCORES = record({"fid": SCORE, "kid": SCORE})
METRIC_ROW = record({"fid": SCORE, "kid": SCORE, "sharpness_ratio": SCORE, "memorisation_ratio": SCORE},
                    {"near_copies": SCORE, "reference": SCORES})
CONFIG_FIELDS = record(
    {"model_args": MODEL_ARGS, "obs_std": number(1e-6, 1e3), "likelihood": text("gaussian", "bernoulli"),
     "step": COUNT, "encoder_step": COUNT,
     "data": record({}, {"train_file": file_name, "test_file": file_name, "train": COUNT, "test": COUNT,
                         "files": COUNT, "unreadable": COUNT, "exact_duplicates": COUNT, "unique": COUNT,
                         "near_duplicate_groups": COUNT, "near_duplicates_dropped": COUNT,
                         "faces_dir": optional(text())})},
    {"image_size": whole(4, 4096), "latent_dim": SIZE, "parameters": COUNT, "vae_steps": COUNT,
     "decoders": each(text("elbo", "sharp"), "a list of decoders (elbo, sharp)"),
     "default_decoder": text("elbo", "sharp"), "sharp_decoder_width": optional(SIZE),
     "test_elbo": optional(SCORE), "test_bpd": optional(SCORE), "project": text(),
     "prior": record({}, {"kind": text("gmm"), "components": optional(COUNT), "codes": optional(COUNT),
                          "seed": optional(COUNT)}),
     "hair": record({}, {"offered": mapping(COUNT), "not_offered": mapping(text())}),
     "training": record({}, {"command": text(), "preset": optional(text()), "batch_size": optional(COUNT),
                             "run": optional(text())}),
     "metrics": optional(record({"n": COUNT, "floor_fid": SCORE, "rows": mapping(mapping(METRIC_ROW))},
                                {"reference": optional(text())}))})
PRIOR_FIT = record({"components": whole(1, 2 ** 16), "step": COUNT},
                   {"kind": text("gmm"), "codes": optional(COUNT), "seed": optional(COUNT),
                    "hair": record({"step": COUNT, "faces": COUNT, "colours": mapping(COUNT),
                                    "not_offered": mapping(text())})})


def refuse(path: Path, problem: str) -> RunNotFound:
    return RunNotFound(f"{path}: {problem}; the file is damaged or was edited: export the run again, or ask "
                       "whoever sent the folder for a new copy")


def fits(document, spec, path: Path) -> None:
    try:
        spec(document, "")
    except Misfit as err:
        raise refuse(path, str(err)) from None


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunNotFound(f"{path} is not readable JSON ({err}); export the run again with "
                          "`python -m pipeline.export`") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise RunNotFound(f"{path} is not an animeface-vae export's config (format {EXPORT_FORMAT!r} expected): "
                          "pass a folder written by `python -m pipeline.export`, or a run folder")
    fits(config, CONFIG_FIELDS, path)
    args = config["model_args"]
    for name in ("image_size", "latent_dim"):
        if name in config and config[name] != args[name]:
            raise refuse(path, f"{name} is {config[name]} but model_args.{name} is {args[name]}")
    if "elbo" not in config.get("decoders", ["elbo"]):
        raise refuse(path, f"decoders is {config['decoders']}, without elbo (every export has the ELBO decoder)")
    return config


def read_tensors(path: Path) -> dict:
    try:
        return load_file(path)
    except (OSError, SafetensorError, ValueError) as err:
        raise RunNotFound(f"{path} is not a readable safetensors file ({err}); export the run again") from None


def checked_weights(path: Path, tensors: dict, expected: dict, what: str) -> dict:
    """`tensors` when they are exactly `expected`'s names, shapes and dtypes, else one line naming the first misfit."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors)
                   if tensors[k].shape != expected[k].shape or tensors[k].dtype != expected[k].dtype)
    if missing or unexpected or wrong:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                  f"{wrong[0]} is {tuple(tensors[wrong[0]].shape)} {tensors[wrong[0]].dtype}, not "
                  f"{tuple(expected[wrong[0]].shape)} {expected[wrong[0]].dtype}")
        raise RunNotFound(f"{path}: its tensors do not fit {what} ({detail}); the file does not belong with its "
                          f"{CONFIG_FILE}: export the run again")
    return tensors


def shapes_of(model_args: dict) -> dict:
    """The state dict a model of `model_args` has, as shapes and dtypes only (built on the meta device: no memory,
    whatever the sizes say)."""
    with torch.device("meta"):
        return VAE(**model_args).state_dict()


def read_model(folder: Path, config: dict) -> tuple[dict, dict | None]:
    """The ELBO model's state dict and the sharp decoder's (None when the export has none), checked."""
    path = folder / MODEL_FILE
    try:
        expected = shapes_of(config["model_args"])
    except (TypeError, ValueError) as err:
        raise RunNotFound(f"{folder / CONFIG_FILE}: model_args {config['model_args']} do not make a model "
                          f"({err}); export the run again") from None
    tensors = read_tensors(path)
    sharp = {k[len(SHARP_PREFIX):]: v for k, v in tensors.items() if k.startswith(SHARP_PREFIX)}
    elbo = {k: v for k, v in tensors.items() if not k.startswith(SHARP_PREFIX)}
    checked_weights(path, elbo, expected, f"the model of model_args {config['model_args']}")
    if "sharp" in config.get("decoders", []):
        width = config.get("sharp_decoder_width")
        shaped = expected if width is None else shapes_of({**config["model_args"], "decoder_width": width})
        decoder = {k: v for k, v in shaped.items() if k.startswith(("project.", "decoder."))}
        checked_weights(path, sharp, decoder, "its sharp decoder")
    elif sharp:
        raise RunNotFound(f"{path}: it holds sharp.* tensors but {folder / CONFIG_FILE} lists no sharp decoder: "
                          "export the run again")
    require_finite(tensors, path, "the tensor")
    return elbo, (sharp or None)


def read_prior_file(folder: Path) -> tuple[dict, dict]:
    """prior.safetensors' tensors and its "fit" metadata, checked."""
    path = folder / PRIOR_FILE
    tensors = read_tensors(path)
    if not set(PRIOR_TENSORS) <= set(tensors):
        raise RunNotFound(f"{path} holds {sorted(tensors)[:5]}, not the prior's {list(PRIOR_TENSORS)}: export the run "
                          "again")
    with safe_open(path, "pt") as f:
        fit = (f.metadata() or {}).get("fit", "{}")
    try:
        fields = json.loads(fit)
    except ValueError:
        fields = None
    if not isinstance(fields, dict) or not {"components", "step"} <= set(fields):
        raise RunNotFound(f"{path}: its metadata is not the prior's fit ({fit[:40]!r}): export the run again")
    fits(fields, PRIOR_FIT, path)
    return tensors, fields


def read_prior(folder: Path, latent_dim: int, prior_file: tuple[dict, dict] | None = None) -> dict:
    """The stored mixture, checked (`prior_file`: read_prior_file's answer, when the caller has it already)."""
    tensors, fields = prior_file or read_prior_file(folder)
    prior = {"kind": "gmm", **{k: v for k, v in fields.items() if k != "hair"},
             **{k: tensors[k] for k in PRIOR_TENSORS}}
    return checked_mixture(prior, folder / PRIOR_FILE, latent_dim)


def read_hair(folder: Path, latent_dim: int, prior_file: tuple[dict, dict] | None = None) -> dict | None:
    """What sampling by hair colour needs, as pipeline/attributes.py stores it; None when exported without."""
    tensors, fields = prior_file or read_prior_file(folder)
    if "hair" not in fields:
        return None
    hair = fields["hair"]
    try:
        colours = {name: {**{k: tensors[f"hair.{name}.{k}"] for k in HAIR_TENSORS}, "faces": faces}
                   for name, faces in hair["colours"].items()}
    except KeyError as err:
        raise RunNotFound(f"{folder / PRIOR_FILE} lacks {err.args[0]}: export the run again") from None
    return checked_hair({"step": hair["step"], "faces": hair["faces"], "not_offered": hair["not_offered"],
                         "colours": colours}, folder / PRIOR_FILE, latent_dim)


def read_export(folder) -> dict:
    """An export folder as the checkpoint dict pipeline.runs reads ("config" names the data splits as
    file names: the caller's data folder holds them)."""
    folder = Path(folder)
    config = read_config(folder)
    elbo, sharp_decoder = read_model(folder, config)
    data = config["data"]
    sharp = {"sharp": {"decoder": sharp_decoder, "decoder_width": config.get("sharp_decoder_width")}} \
        if sharp_decoder else {}
    return {"model_args": config["model_args"], "model": elbo, **sharp,
            "step": config["step"], "encoder_step": config["encoder_step"], "obs_std": config["obs_std"],
            "likelihood": config["likelihood"], "best_test_elbo": config.get("test_elbo"),
            "config": {"train": {"train_file": data.get("train_file", "train.npy"),
                                 "test_file": data.get("test_file", "test.npy")}}, "export": config}
