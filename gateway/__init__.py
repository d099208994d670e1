"""The x402gw gateway: the Starlette app, its pipeline stages, the protocol bridge, the CLI.

Composes ``catalog`` and ``settlement``; nothing imports ``gateway`` but tests and the CLI.
"""
