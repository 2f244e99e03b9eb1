"""sarkit: the SAR-KnowLIP pipeline as a plugin-based toolkit."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sarkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
