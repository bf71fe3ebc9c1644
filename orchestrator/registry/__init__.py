"""Registered encoders in the MLflow model registry: list, show, best, promote, load, embed.

One registered model per dataset, `<dataset>-encoder`; the alias `champion` names its best version.
The package's public names are importable from here; each lives in the module named for its concern:

- `versions`: `connect` to the store, model references (`NAME`, `NAME@ALIAS`, `NAME/VERSION`),
  `resolve_version`, `list_versions`, `best_version`, `version_metric`.
- `champion`: the champion rule, `promote_if_better` (sweeps and pretrain call it), and `promote`,
  both under `champion_lock`.
- `register`: `register_run_encoder`, the one registration path of pretrain and sweeps (idempotent
  per run, created with its tags), and `default_model_name`.
- `encoder_files`: the two files a registered encoder is rebuilt from (`encoder.json`,
  `encoder.safetensors`) and their strict reading.
- `loading`: `load_encoder`, the one place that loads a registered model (rebuilt by selfsup's
  code, nothing from the store runs).
- `embed`: `embed`, embeddings of an image folder or shard folder written to Parquet.
- `cli`: `selfsup registry ...` (its arguments are defined in `orchestrator.cli`).
"""

from orchestrator.registry.champion import (PROTOCOL_TAGS, Promotion, champion_lock, promote, promote_if_better,
                                            protocol_differences)
from orchestrator.registry.embed import IMAGE_SUFFIXES, embed
from orchestrator.registry.safe_load import LoadedEncoder, load_encoder
from orchestrator.registry.register import Registration, default_model_name, register_run_encoder
from orchestrator.registry.versions import (CHAMPION, ModelRef, best_version, connect, list_versions, name_filter,
                                            parse_ref, registered_names, resolve_version, version_metric)

__all__ = ["CHAMPION", "IMAGE_SUFFIXES", "PROTOCOL_TAGS", "LoadedEncoder", "ModelRef", "Promotion", "Registration",
           "best_version", "champion_lock", "connect", "default_model_name", "register_run_encoder", "embed", "list_versions", "load_encoder", "name_filter", "parse_ref", "promote",
           "promote_if_better", "protocol_differences", "registered_names", "resolve_version", "version_metric"]
