"""ichnode configuration: the settings model, the default TOML and loading it."""

from config.settings import (
    ConfigError,
    DestinationSettings,
    InferenceSettings,
    NodeSettings,
    SchedulerSettings,
    Settings,
    StorageSettings,
    load_settings,
)
from config.version import ICHNODE_VERSION

__all__ = [
    "ICHNODE_VERSION",
    "ConfigError",
    "DestinationSettings",
    "InferenceSettings",
    "NodeSettings",
    "SchedulerSettings",
    "Settings",
    "StorageSettings",
    "load_settings",
]
