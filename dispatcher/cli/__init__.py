"""``gpuq``, the operators' command line (console script ``gpuq = dispatcher.cli:main``)."""

from dispatcher.cli.app import app, main

__all__ = ["app", "main"]
