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

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from pipeline.errors import RunNotFound
from pipeline.model import VAE

EXPORT_FORMAT = "animeface-vae-export/1"
MODEL_FILE, PRIOR_FILE, CONFIG_FILE = "model.safetensors", "prior.safetensors", "config.json"
CARD_FILE, GRID_FILE, CASCADE_FILE = "README.md", "samples.png", "lbpcascade_animeface.xml"
SLIDERS_FILE = "sliders.json"
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
    missing = [k for k in ("model_args", "obs_std", "likelihood", "step", "encoder_step", "data") if k not in config]
    if missing:
        raise RunNotFound(f"{path} lacks {', '.join(missing)}: export the run again with `python -m pipeline.export`")
    return config


def read_tensors(path: Path) -> dict:
    try:
        return load_file(path)
    except (OSError, SafetensorError, ValueError) as err:
        raise RunNotFound(f"{path} is not a readable safetensors file ({err}); export the run again") from None


def checked_weights(path: Path, tensors: dict, expected: dict, what: str) -> dict:
    """`tensors` when they are exactly `expected`'s names and shapes, else one line naming the first misfit."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                  f"{wrong[0]} is {tuple(tensors[wrong[0]].shape)}, not {tuple(expected[wrong[0]].shape)}")
        raise RunNotFound(f"{path}: its tensors do not fit {what} ({detail}); the file does not belong with its "
                          f"{CONFIG_FILE}: export the run again")
    return tensors


def read_model(folder: Path, config: dict) -> tuple[dict, dict | None]:
    """The ELBO model's state dict and the sharp decoder's (None when the export has none), checked."""
    path = folder / MODEL_FILE
    tensors = read_tensors(path)
    try:
        expected = VAE(**config["model_args"]).state_dict()
    except (TypeError, ValueError) as err:
        raise RunNotFound(f"{folder / CONFIG_FILE}: model_args {config['model_args']} do not make a model "
                          f"({err}); export the run again") from None
    sharp = {k[len(SHARP_PREFIX):]: v for k, v in tensors.items() if k.startswith(SHARP_PREFIX)}
    elbo = {k: v for k, v in tensors.items() if not k.startswith(SHARP_PREFIX)}
    checked_weights(path, elbo, expected, f"the model of model_args {config['model_args']}")
    if "sharp" in config.get("decoders", []):
        width = config.get("sharp_decoder_width")
        shaped = expected if width is None else VAE(**{**config["model_args"], "decoder_width": width}).state_dict()
        decoder = {k: v for k, v in shaped.items() if k.startswith(("project.", "decoder."))}
        checked_weights(path, sharp, decoder, "its sharp decoder")
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
        fields = fields if {"components", "step"} <= set(fields) else None
    except ValueError:
        fields = None
    if fields is None:
        raise RunNotFound(f"{path}: its metadata is not the prior's fit ({fit[:40]!r}): export the run again")
    return tensors, fields


def read_prior(folder: Path) -> dict:
    tensors, fields = read_prior_file(folder)
    return {"kind": "gmm", **{k: v for k, v in fields.items() if k != "hair"}, **{k: tensors[k] for k in PRIOR_TENSORS}}


def read_hair(folder: Path) -> dict | None:
    """What sampling by hair colour needs, as pipeline/attributes.py stores it; None when exported without."""
    tensors, fields = read_prior_file(folder)
    if "hair" not in fields:
        return None
    hair = fields["hair"]
    try:
        colours = {name: {**{k: tensors[f"hair.{name}.{k}"] for k in HAIR_TENSORS}, "faces": faces}
                   for name, faces in hair["colours"].items()}
    except KeyError as err:
        raise RunNotFound(f"{folder / PRIOR_FILE} lacks {err.args[0]}: export the run again") from None
    return {"step": hair["step"], "faces": hair["faces"], "not_offered": hair["not_offered"], "colours": colours}


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
