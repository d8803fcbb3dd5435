"""Experiment configs: the schema (:mod:`~kdlab.config.schema`), YAML reading and writing
(:mod:`~kdlab.config.yaml_io`) and the generated reference (:mod:`~kdlab.config.reference`).

Names (datasets, optimizers, tasks, ...) are checked only through the registries of
:mod:`kdlab.core.registries`, so this layer imports nothing of kdlab above :mod:`kdlab.core`.
"""

from kdlab.config.schema import (
    DETECTION_DATASETS,
    RESIDENT_DATASETS,
    SEGMENTATION_DATASETS,
    STREAMED_DATASETS,
    DataConfig,
    DetectionConfig,
    ExperimentConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    PartnerConfig,
    RuntimeConfig,
    SegmentationConfig,
    SyntheticDataConfig,
    WandbConfig,
    dict_fingerprint,
    fingerprint_dict,
    format_validation_error,
    model_in_annotation,
    validate_config,
)
from kdlab.config.yaml_io import (
    ConfigLoader,
    DuplicateKeyError,
    apply_overrides,
    dump_yaml,
    load_config,
    load_yaml_text,
    parse_override,
    read_yaml,
    read_yaml_file,
    validate_config_with_plugins,
)

__all__ = [
    "ConfigLoader",
    "DETECTION_DATASETS",
    "DataConfig",
    "DetectionConfig",
    "SEGMENTATION_DATASETS",
    "SegmentationConfig",
    "DuplicateKeyError",
    "ExperimentConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "PartnerConfig",
    "RESIDENT_DATASETS",
    "RuntimeConfig",
    "STREAMED_DATASETS",
    "SyntheticDataConfig",
    "WandbConfig",
    "apply_overrides",
    "dict_fingerprint",
    "dump_yaml",
    "fingerprint_dict",
    "format_validation_error",
    "load_config",
    "load_yaml_text",
    "model_in_annotation",
    "parse_override",
    "read_yaml",
    "read_yaml_file",
    "validate_config",
    "validate_config_with_plugins",
]
