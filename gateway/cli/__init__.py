"""The ``x402gw`` command line: ``main`` is the console script; one module per command group."""

from gateway.cli.main import main

__all__ = ["main"]
