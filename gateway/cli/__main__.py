"""``python -m gateway.cli``: the same as the ``x402gw`` console script."""

from gateway.cli.main import main

main()
