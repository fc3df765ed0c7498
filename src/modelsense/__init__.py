"""modelsense: how a trained network depends on its data, its parameters, and another network's representations."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("modelsense")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
