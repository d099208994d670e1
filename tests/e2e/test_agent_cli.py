"""``x402gw agent`` against a running gateway on anvil: discovers, pays within its limit, prints the receipt."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from settlement.ledger import PaymentState
from tests.conftest import PAY_TO, Devchain, RunningGateway

PAYER = 7


def run_agent(gateway: RunningGateway, devchain: Devchain, *args: str) -> subprocess.CompletedProcess[str]:
    # The agent reads the token from the dev chain, found through its deployment file.
    env = {**os.environ, "AGENT_KEY": devchain.key(PAYER), "X402GW_DEPLOYMENT_FILE": str(devchain.deployment_file)}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "agent", "--gateway", gateway.url, "--key-env", "AGENT_KEY", *args],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )


def test_agent_discovers_pays_and_prints_the_receipt(gateway: RunningGateway, devchain: Devchain) -> None:
    payer = devchain.address(PAYER)
    before_payer, before_pay_to = devchain.balance(payer), devchain.balance(PAY_TO)
    result = run_agent(gateway, devchain, "--max-spend", "0.05", "--tool", "get_quote", "--args", '{"symbol": "ACME"}')
    assert result.returncode == 0, result.stdout + result.stderr
    receipt = re.search(r"receipt  tool get_quote  price 0.002  status 200  tx (0x[0-9a-f]{64})  settled True"
                        r"  payer 0x[0-9a-fA-F]{40}  spent 0.002 of 0.05", result.stdout)
    assert receipt, result.stdout
    assert '"symbol": "ACME"' in result.stdout
    assert devchain.balance(payer) == before_payer - 2000
    assert devchain.balance(PAY_TO) == before_pay_to + 2000
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.tx_hash == receipt.group(1)
    # its own payment-identifier (on no chain): nobody who rebuilds the payload from the chain gets a replay
    assert row.payment_identifier is not None and re.fullmatch(r"agent_[0-9a-f]{32}", row.payment_identifier)


def test_agent_picks_the_first_callable_tool_when_none_is_given(gateway: RunningGateway, devchain: Devchain) -> None:
    # No --tool: get_quote needs a symbol and has no example, so with these arguments the first
    # tool is still get_quote (the agent does not guess arguments the schema gives no value for).
    result = run_agent(gateway, devchain, "--max-spend", "0.01", "--args", '{"symbol": "IBM"}')
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"receipt  tool get_quote .* tx 0x[0-9a-f]{64}", result.stdout), result.stdout


def test_agent_refuses_to_pay_over_its_limit(gateway: RunningGateway, devchain: Devchain) -> None:
    payer = devchain.address(PAYER)
    before = devchain.balance(payer)
    result = run_agent(gateway, devchain, "--max-spend", "0.005", "--tool", "create_order",
                       "--args", '{"symbol": "MSFT", "quantity": 1}')
    assert result.returncode == 3, result.stdout + result.stderr
    assert "would exceed the spend limit" in result.stderr
    assert devchain.balance(payer) == before
    assert gateway.ledger.all() == []


def test_agent_needs_arguments_it_cannot_guess(gateway: RunningGateway, devchain: Devchain) -> None:
    result = run_agent(gateway, devchain, "--max-spend", "0.05", "--tool", "get_weather")
    assert result.returncode == 1
    assert "get_weather needs arguments (city); pass --args JSON" in result.stderr
