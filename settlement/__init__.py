"""x402 settlement: wire models, the exact-EVM scheme, facilitators, chain access, ledger.

May import `catalog`; knows no HTTP framework.
"""
