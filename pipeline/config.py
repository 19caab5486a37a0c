"""Checking a composed config before any work starts, and unique run-folder names.

Each stage declares its keys as a dataclass next to its code (a Hydra structured config); `checked`
merges the composed config into that schema, so a wrong type, an unknown key or a value out of range
stops the command with one line naming the key (exit status 2) before anything is read or written.
"""
import dataclasses
import math
import types
import typing
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError

def key(low=None, high=None, choices=None, default=MISSING) -> Any:
    """A schema field with an optional inclusive range or a set of allowed values."""
    metadata = {"low": low, "high": high, "choices": choices}
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def checked(cfg: DictConfig, schema: type, remedy: str = "fix it on the command line or in conf/") -> DictConfig:
    """`cfg` typed by `schema` (a dataclass), or a ConfigError naming the first bad key (and `remedy`)."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        OmegaConf.to_container(typed, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(describe_error(cfg, schema, err, remedy)) from None
    check_ranges(typed, schema, "")
    return typed


def describe_error(cfg: DictConfig, schema: type, err: OmegaConfBaseException, remedy: str) -> str:
    name = err.full_key or ""
    field_type = schema_type(schema, name)
    if field_type is None:
        return f"{name or 'config'}: {str(err.msg).splitlines()[0]}"
    value = OmegaConf.select(cfg, name, throw_on_resolution_failure=False)
    shown = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
    return f"{name}={shown!r} is not {type_words(field_type)}" + (f"; {remedy}" if remedy else "")


def schema_type(schema: type, dotted: str):
    """The declared type of a dotted key, or None where the key is not in the schema."""
    for part in dotted.split("."):
        fields = {f.name: f.type for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
        if part not in fields:
            return None
        schema = fields[part]
    return schema


def type_words(field_type) -> str:
    args = [a for a in typing.get_args(field_type) if a is not type(None)]
    if typing.get_origin(field_type) in (typing.Union, types.UnionType):
        return f"{type_words(args[0])} (or null)"
    if typing.get_origin(field_type) is list:
        return f"a list of {type_words(args[0])} values, e.g. [a, b]"
    if typing.get_origin(field_type) is dict:
        return "a mapping, e.g. {k: v}"
    words = {float: "a number", int: "a whole number", bool: "true or false", str: "text"}
    return words.get(field_type, getattr(field_type, "__name__", str(field_type)))


def check_ranges(cfg: DictConfig, schema: type, prefix: str) -> None:
    for field in dataclasses.fields(schema):
        value, name = cfg[field.name], prefix + field.name
        if dataclasses.is_dataclass(field.type):
            check_ranges(value, field.type, name + ".")
            continue
        low, high, choices = (field.metadata.get(k) for k in ("low", "high", "choices"))
        if value is None:
            continue
        if isinstance(value, ListConfig):
            if low is not None and len(value) < low:
                raise ConfigError(f"{name}={list(value)} needs at least {low} item(s)")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} is not a finite number")
        if choices is not None and value not in choices:
            raise ConfigError(f"{name}={value!r}: use one of {', '.join(map(str, choices))}")
        if low is not None and value < low or high is not None and value > high:
            bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
            raise ConfigError(f"{name}={value!r} is out of range: it must be {bounds}")


@dataclasses.dataclass
class Paths:
    data_dir: str = MISSING
    output_dir: str = MISSING
