"""The ichnode version, as installed."""

from importlib.metadata import PackageNotFoundError, version

try:
    ICHNODE_VERSION: str = version("ichnode")
except PackageNotFoundError:  # running from a source tree that was not installed
    ICHNODE_VERSION = "0.0.0+source"
