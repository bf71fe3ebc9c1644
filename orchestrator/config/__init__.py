"""The pretraining config: typed dataclasses with every default in one place.

A config is built from the defaults, then a YAML file (``--config``), then ``--set a.b=c``
overrides, in that order. Every key and value is checked before Ray starts; a bad one raises
`ConfigError` with one message naming the file or flag, the field, the value and what is allowed.

The names are importable from here; each lives in the module named for its concern:

- `schema`: the section dataclasses and `Config`, their defaults and allowed names, and the type
  check of a field's value.
- `loading`: `load_config` (defaults, file, overrides), `apply_overrides`, `where_set`, run names,
  storage locations, `to_yaml`.
- `validation`: `validate` (one check per section) and `check_data_folder`.
"""

from orchestrator.config.sources import (STORAGE_ENV, absolute_paths, apply_overrides, config_name, load_config, parse_overrides,
                                         read_yaml, storage_location, to_yaml, where_set)
from orchestrator.config.schema import (AUGMENT_FIELDS, AUGMENT_ON, AUGMENT_PRESETS, DINO_LOCAL_CROPS, ENCODER_NAMES,
                                        LOADERS, MAX_BATCH_SIZE, MAX_IMAGE_SIZE, MAX_VIEWS_GIB, METHOD_NAMES,
                                        METHOD_ONLY, METHOD_PRESET, MODEL_NAME, OPTIMIZER_NAMES, RUN_NAME, Config,
                                        ConfigError, DataConfig, EvalConfig, MethodConfig, ModelConfig, OptimConfig,
                                        RunConfig, ScalingConfig, TrackingConfig, parse_value, set_field)
from orchestrator.config.validation import check_data_folder, validate

__all__ = ["AUGMENT_FIELDS", "AUGMENT_ON", "AUGMENT_PRESETS", "DINO_LOCAL_CROPS", "ENCODER_NAMES", "LOADERS",
           "MAX_BATCH_SIZE", "MAX_IMAGE_SIZE", "MAX_VIEWS_GIB", "METHOD_NAMES", "METHOD_ONLY", "METHOD_PRESET",
           "MODEL_NAME", "OPTIMIZER_NAMES", "RUN_NAME", "STORAGE_ENV", "Config", "ConfigError", "DataConfig",
           "EvalConfig", "MethodConfig", "ModelConfig", "OptimConfig", "RunConfig", "ScalingConfig", "TrackingConfig",
           "absolute_paths", "apply_overrides", "check_data_folder", "config_name", "load_config", "parse_overrides",
           "parse_value", "read_yaml", "set_field", "storage_location", "to_yaml", "validate", "where_set"]
