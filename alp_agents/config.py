"""Typed configuration: pydantic models loaded from TOML, with `--set a.b=value` overrides.

Every config model derives from `Config`, which forbids unknown keys. `load_config` turns
pydantic's validation errors into one ConfigError that names each bad field by its dotted path,
with the nearest valid key for a typo and the expected type for a wrong value.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from alp_agents.errors import ConfigError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and a section given in part
    keeps the values its default sets (see `_sections_keep_their_defaults`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _sections_keep_their_defaults(cls, data: Any) -> Any:
        """`[trainer] algo = "bypass"` keeps the run's trainer.lr (its default section sets it), not TrainerConfig's own.

        A field whose default is a section built with some values (`TrainerConfig(lr=1e-5)`) would otherwise lose them
        as soon as any key of that section is given: the keys given are applied on top of the values the default set.
        """
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, field in cls.model_fields.items():
            if isinstance(data.get(name), dict) and field.default_factory is not None:
                default = field.get_default(call_default_factory=True)
                if isinstance(default, BaseModel) and default.model_fields_set:
                    merged[name] = {**default.model_dump(include=default.model_fields_set), **data[name]}
        return merged


def parse_override(override: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], value); the value is read as JSON/TOML when it can be."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like key.path=value, e.g. trainer.lr=1e-6")
    return key.strip().split("."), _parse_value(raw.strip())


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # a bare word such as `alp` is a string


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.path=value` override set."""
    data = json.loads(json.dumps(data))  # deep copy of plain TOML data
    for override in overrides:
        path, value = parse_override(override)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:  # absent, or an optional section left unset (null)
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(model: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Load `model` from a TOML file (optional) plus overrides; fail with every bad field named, and
    with the `--set` override that set it where one did."""
    overrides = overrides or []
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from e
    return load_config_data(model, apply_overrides(data, overrides), where=str(path) if path is not None else None, overrides=overrides)


def load_config_data(model: type[C], data: dict[str, Any], *, where: str | None = None, overrides: list[str] | None = None) -> C:
    """Validate plain data (e.g. parsed TOML) as `model`; fail with every bad field named.

    A bad field that one of `overrides` set is blamed on that `--set` override rather than on `where`
    (the file), which may not even mention the field. One problem makes a one-line message.
    """
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        blamed = [_override_of([str(part) for part in err["loc"]], overrides or []) for err in errors]
        problems = [_describe(model, err) + (f" (from --set {override})" if override else "") for err, override in zip(errors, blamed)]
        head = f"invalid config{f' in {where}' if where and None in blamed else ''}"
        if len(problems) == 1:
            raise ConfigError(f"{head}: {problems[0]}") from e
        raise ConfigError(head + ":" + "".join(f"\n  - {problem}" for problem in problems)) from e


def _override_of(loc: list[str], overrides: list[str]) -> str | None:
    """The last override (the one that wins) that set the field at `loc`, a section holding it, or a value inside it."""
    for override in reversed(overrides):
        key, _ = parse_override(override)
        if loc and (loc[: len(key)] == key or key[: len(loc)] == loc):
            return override
    return None


def _describe(model: type[BaseModel], error: Any) -> str:
    loc = [str(part) for part in error["loc"]]
    if not loc:  # a rule across fields (a model validator): its message names them
        return error["msg"].removeprefix("Value error, ")
    dotted = ".".join(loc)
    if error["type"] == "extra_forbidden":
        valid = _field_names(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join(loc[:-1] + close)!r}?" if close else f"; valid keys here: {', '.join(sorted(valid))}"
        return f"unknown key {dotted!r}{hint}"
    expected = _field_annotation(model, loc)
    got = error.get("input")
    return f"{dotted}: {error['msg']} (expected {expected}, got {got!r})"


def _field_names(model: type[BaseModel], path: list[str]) -> list[str]:
    section = _section(model, path)
    return list(section.model_fields) if section else []


def _field_annotation(model: type[BaseModel], path: list[str]) -> str:
    section = _section(model, path[:-1])
    if section is None or path[-1] not in section.model_fields:
        return "a valid value"
    annotation = section.model_fields[path[-1]].annotation
    return getattr(annotation, "__name__", str(annotation))


def config_reference(config: BaseModel, prefix: str = "") -> str:
    """A markdown table of every field of `config` and its sections: key, type, default (its value here), meaning."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"] if not prefix else []
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            rows.append(config_reference(value, f"{prefix}{name}."))
            continue
        meaning = " ".join((field.description or "").split()).replace("|", "\\|")  # a bare | would end the cell
        rows.append(f"| `{prefix}{name}` | {_type_name(field.annotation)} | `{json.dumps(value, default=str)}` | {meaning} |")
    return "\n".join(rows)


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " \\| ".join(repr(choice) for choice in get_args(annotation))
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "").replace("|", "\\|")


def _section(model: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model
