"""Typed run configuration (no torch here)."""

from lifealign.config.load import ConfigError, config_from_dict, dump_config, load_config, trajectory_hash
from lifealign.config.schema import (
    DataSection,
    EvalSection,
    LoraSection,
    LossTerm,
    MethodSection,
    ModelSection,
    RunConfig,
    SFTSection,
    TaskSection,
    TrainSection,
)

__all__ = [
    "ConfigError",
    "DataSection",
    "EvalSection",
    "LoraSection",
    "LossTerm",
    "MethodSection",
    "ModelSection",
    "RunConfig",
    "SFTSection",
    "TaskSection",
    "TrainSection",
    "config_from_dict",
    "dump_config",
    "load_config",
    "trajectory_hash",
]
