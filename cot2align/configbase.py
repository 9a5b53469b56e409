"""Typed config dataclasses: building from dicts, dotted overrides, validation.

Each component keeps its own dataclass next to its code; they subclass `ConfigBase`
and are composed into the root `cot2align.config.Config`. Merge order is always:
dataclass defaults <- YAML file <- dotted CLI overrides (`loss.ot.epsilon=0.1`).
Unknown keys, wrong types and values outside a `Literal[...]` are errors that name
the dotted key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository (configs/, slurm/, launcher/) this package was imported from."""

T = TypeVar("T", bound="ConfigBase")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type `tp`, or raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: got {value!r}, expected one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: got null, expected {_type_name(tp)}")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
    if origin in (list, tuple):
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: got {value!r}, expected a list of {_type_name(get_args(tp)[0])}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, ConfigBase):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping of {tp.__name__} fields")
        return tp.from_dict(value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: got {value!r}, expected a string")
    return value


@dataclasses.dataclass
class ConfigBase:
    """Base of every config dataclass: strict construction from mappings and validation."""

    @classmethod
    def _hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
        """Build from a (possibly partial) mapping; missing fields keep their defaults."""
        return cls().merged(data, prefix)

    def merged(self: T, data: dict[str, Any], prefix: str = "") -> T:
        """Return a copy with `data` merged in (nested mappings merge field by field)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r}")
        hints = self._hints()
        names = [f.name for f in dataclasses.fields(self)]
        updates: dict[str, Any] = {}
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in names:
                raise ConfigError(f"unknown config key {key!r}; allowed keys here: {', '.join(names)}")
            current = getattr(self, k)
            if isinstance(current, ConfigBase) and isinstance(v, dict):
                updates[k] = current.merged(v, key)
            else:
                updates[k] = _coerce(v, hints[k], key)
        return dataclasses.replace(self, **updates)

    def with_overrides(self: T, overrides: list[str]) -> T:
        """Apply `a.b.c=value` overrides; values are parsed as YAML scalars/lists."""
        cfg = self
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value (e.g. loss.ot.epsilon=0.1)")
            dotted, raw = item.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError as e:
                raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
            nested: Any = value
            for part in reversed(dotted.strip().split(".")):
                nested = {part: nested}
            cfg = cfg.merged(nested)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-serialisable)."""

        def conv(v: Any) -> Any:
            if isinstance(v, ConfigBase):
                return v.to_dict()
            if isinstance(v, list | tuple):
                return [conv(x) for x in v]
            return v

        return {f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        """The config as YAML, in field order (what run directories keep as config.yaml)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self, prefix: str = "") -> None:
        """Check cross-field constraints; recurse into nested configs. Override `check`."""
        self.check(prefix)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, ConfigBase):
                v.validate(f"{prefix}.{f.name}" if prefix else f.name)

    def check(self, prefix: str) -> None:
        """Component-specific validation; raise ConfigError naming `prefix.key`."""


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (sorted)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def require(cond: bool, key: str, message: str) -> None:
    """Raise ConfigError(f"{key}: {message}") unless `cond`."""
    if not cond:
        raise ConfigError(f"{key}: {message}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    return data
