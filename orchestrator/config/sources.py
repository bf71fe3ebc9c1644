"""Building a config: the defaults, then a YAML file (``--config``), then ``--set a.b=c`` overrides,
in that order; and the names and places a config gives (run names, storage locations, YAML).

Every key and value is checked before Ray starts; a bad one raises `ConfigError` with one message
naming the file or flag, the field, the value and what is allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config.schema import Config, ConfigError, set_field
from orchestrator.config.validation import validate
from pipelines import storage


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """["a.b=1", "c.d=x"] -> {"a.b": 1, "c.d": "x"}; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=0.1")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out


def apply_overrides(cfg: Config, overrides: dict[str, Any], *, source: str = "--set") -> Config:
    """A copy of `cfg` with {"section.field": value} applied (typed and checked like YAML)."""
    new = Config.from_dict(cfg.to_dict())
    for dotted, value in overrides.items():
        label = f"{source} {dotted}={value}"
        set_field(new, dotted, value, label, label)
    return new


def load_config(path: str | None, overrides: list[str] | None = None, *, check: bool = True,
                check_data: bool | None = True) -> Config:
    """Defaults, then the YAML file at `path` (None: the built-in demo), then `--set` overrides.

    Args:
        path: YAML file; sections and fields it leaves out keep their defaults.
        overrides: ["section.field=value", ...] as given to ``--set``.
        check: run `validate` (data folder, GPU, ...) on the result; its message starts with where
            the field it names was set (`--set KEY=VALUE` or the file), see `where_set`.
        check_data: passed to `validate`; None checks the data folder only when no `data.source`
            will ingest it first.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or impossible value.
    """
    cfg, raw = Config(), None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file")
        raw = read_yaml(p)
        cfg = Config.from_dict(raw or {}, source=str(path))
    over = parse_overrides(overrides or [])
    cfg = apply_overrides(cfg, over)
    if check:
        try:
            validate(cfg, check_data=cfg.data.source is None if check_data is None else check_data)
        except ConfigError as e:
            raise ConfigError(where_set(str(e), path=path, raw=raw, overrides=over)) from None
    return cfg


def read_yaml(p: Path) -> Any:
    """A YAML file's content, or `ConfigError` naming the file when it is unreadable or not YAML text."""
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); a config is a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None


_NAMED_FIELD = re.compile(r"([a-z_]+)\.([a-z_0-9]+) = .*?: ")


def where_set(message: str, *, path: str | None, raw: Any, overrides: dict[str, Any]) -> str:
    """A validation error ("section.field = value: what is allowed") told from where that field was
    set, as the type errors are: "--set section.field=value: ..." when an override set it,
    "PATH: section.field = value: ..." when the file does; unchanged for a default value (or a
    message that names no field first)."""
    m = _NAMED_FIELD.match(message)
    if m is None:
        return message
    key = f"{m[1]}.{m[2]}"
    if key in overrides:
        return f"--set {key}={overrides[key]}: {message[m.end():]}"
    if path is not None and isinstance(raw, dict) and isinstance(raw.get(m[1]), dict) and m[2] in raw[m[1]]:
        return f"{path}: {message}"
    return message


# A cluster's shared store (cluster.yaml sets it on every node, e.g. s3://BUCKET/selfsup): relative
# run.storage_path / sweep.storage_path ("runs", "runs/sweeps" in the presets) resolve under it, so
# the presets' commands need no extra flags there.
STORAGE_ENV = "SELFSUP_STORAGE"


def storage_location(path: str) -> str:
    """`run.storage_path` / `sweep.storage_path` as a location (`pipelines.storage`): a URI or an
    absolute path as given; a relative path under `$SELFSUP_STORAGE` when that is set, else under
    the working directory."""
    base = os.environ.get(STORAGE_ENV)
    if base and not storage.is_uri(path) and not Path(path).expanduser().is_absolute() \
            and not path.startswith("file://"):
        return storage.join(storage.absolute(base), path)
    return storage.absolute(path)


def config_name(path: str | None) -> str:
    """The stem used for automatic run names: 'demo' for the built-in demo, else the file stem."""
    return "demo" if path is None else Path(path).stem


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (logged with each run; loads back with `load_config`)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def absolute_paths(cfg: Config) -> Config:
    """A copy with local `data.path` and `run.storage_path` made absolute (Train workers run in other
    folders); URIs stay as they are."""
    d = cfg.to_dict()
    d["data"]["path"] = storage.absolute(cfg.data.path)
    d["run"]["storage_path"] = storage_location(cfg.run.storage_path)
    return Config.from_dict(d)

