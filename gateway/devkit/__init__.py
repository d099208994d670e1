"""The development kit: on top of everything, imported by the CLI and the tests, never by the
gateway itself. Public anvil dev keys only: never point it at a real network.

    agent/       the reference paying agent (token facts, offer checks, paying, discovered tools)
    payer.py     signs EIP-3009 authorizations for an offer
    anvil.py     an anvil node as a child process
    devchain.py  the local chain: the test token deployed and funded, ``x402gw devchain``
    demo.py      ``x402gw demo``: chain, sample upstream, gateway and agent in one process
    demo_ledger.py  where the demo's ledger is, and the pointer ``x402gw ledger`` reads
    contracts/   the compiled test token and batch settler (package data = contracts/build/)
    samples/     sample upstreams (REST, SOAP)

Nothing is imported here: each module is loaded on its own, so the agent does not pull in web3
and anvil, nor the CLI the demo's dependencies.
"""

__all__: list[str] = []
