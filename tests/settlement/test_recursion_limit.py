"""The interpreter's recursion limit stays Python's default once the chain stack is imported: py-ecc
raises it to 100,000, at which depth the C JSON decoder exhausts the stack and kills the process
instead of raising RecursionError (tests/e2e/test_attacks_deep_json.py shows it against a gateway)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_gateway_keeps_a_recursion_limit_the_stack_holds() -> None:
    probe = ("import sys, json, eth_account, web3, gateway.cli.main, gateway.app\n"
             "try:\n    json.loads('[' * 200_000 + ']' * 200_000)\nexcept RecursionError:\n    print('refused')\n"
             "print(sys.getrecursionlimit())\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-500:]}"
    assert done.stdout.split() == ["refused", "1000"]
