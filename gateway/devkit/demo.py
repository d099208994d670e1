"""``x402gw demo``: the whole stack on one machine, and an agent paying for calls.

Starts anvil and deploys the test USDC, the sample legacy REST upstream and SOAP warehouse, and the
gateway with the example catalogs (demo.yaml, warehouse.yaml); a sample agent (anvil account 1) pays for a few calls and each is printed with
its price, HTTP status and settlement transaction. Then it prints where the ledger is and the exact
command that exports it, and the gateway keeps serving until Ctrl-C (or SIGTERM).

However it ends, nothing is left behind: SIGINT and SIGTERM stop the servers and anvil; a signal
that cannot be handled (SIGKILL) still takes anvil with it (``PR_SET_PDEATHSIG``, see
``gateway.devkit.anvil``); the port check counts only a listener as "in use", not the TIME_WAIT
connections a stopped demo leaves, so a restart at once gets the same ports.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import signal
import socket
from pathlib import Path

import httpx
import uvicorn

from catalog import format_amount
from gateway.app import create_app
from gateway.devkit.agent import PayingAgent, discover, read_token_facts
from gateway.devkit.demo_ledger import DEMO_DIR, DEMO_LEDGER, DEMO_LEDGER_POINTER, export_command, write_pointer
from gateway.devkit.devchain import Anvil, Deployment, DevchainError, setup_devchain
from gateway.devkit.samples import rest_upstream, soap_warehouse
from gateway.ops.serving import ThreadServer
from gateway.settings import DEFAULT_CATALOG, Settings
from settlement.schema import open_ledger

UPSTREAM_PORT = 9101  # the example catalog's upstream base_url
WAREHOUSE_PORT = 9102  # the SOAP sample, upstream of catalog/examples/warehouse.yaml
WAREHOUSE_CATALOG = DEFAULT_CATALOG.with_name("warehouse.yaml")
_RELATIVE_WSDL = re.compile(r"(\bwsdl:\s*)([^\s/#][^\s#]*)")

# (method, path, json body) the sample agent pays for, in turn.
PLAN: list[tuple[str, str, dict[str, object] | None]] = [
    ("GET", "/quotes/AAPL", None),
    ("GET", "/warehouse/stock/BLT-100", None),  # SOAP 1.1, answered as JSON
    ("GET", "/weather?city=Lisbon&units=metric", None),
    ("POST", "/orders", {"symbol": "MSFT", "quantity": 3}),
    ("POST", "/warehouse/shipping-quote", {"sku": "BLT-100", "quantity": 40, "postcode": "1000-001"}),  # SOAP 1.2, flaky: retried
    ("GET", "/fx/EURUSD?source=ecb", None),  # REST, 429 + Retry-After: waited out, charged once
    ("GET", "/warehouse/items?query=bolt", None),  # SOAP envelope built from the WSDL
    ("GET", "/reports/42", None),
    ("GET", "/quotes/NVDA", None),
]


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True unless something listens on ``host:port``. SO_REUSEADDR, as uvicorn binds: the
    TIME_WAIT connections a stopped demo leaves for a minute do not count as "in use"."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _absolute(folder: Path, match: re.Match[str]) -> str:
    return f"{match.group(1)}{(folder / match.group(2)).resolve()}"


def _catalogs(upstream_url: str, warehouse_url: str) -> list[Path]:
    """The example catalogs, rewritten into the demo's directory when the samples listen elsewhere
    than the ports the examples name (``--upstream-port``, ``--warehouse-port``)."""
    if (upstream_url, warehouse_url) == (f"http://127.0.0.1:{UPSTREAM_PORT}", f"http://127.0.0.1:{WAREHOUSE_PORT}"):
        return [DEFAULT_CATALOG, WAREHOUSE_CATALOG]
    rewritten = []
    for source in (DEFAULT_CATALOG, WAREHOUSE_CATALOG):
        text = (source.read_text(encoding="utf-8")
                .replace(f"http://localhost:{UPSTREAM_PORT}", upstream_url.replace("127.0.0.1", "localhost"))
                .replace(f"http://127.0.0.1:{UPSTREAM_PORT}", upstream_url)
                .replace(f"http://127.0.0.1:{WAREHOUSE_PORT}", warehouse_url))
        # Files a catalog names relative to itself (a WSDL) stay where they are.
        text = _RELATIVE_WSDL.sub(functools.partial(_absolute, source.parent), text)
        target = DEMO_DIR / source.name
        target.write_text(text, encoding="utf-8")
        rewritten.append(target)
    return rewritten


async def _agent_calls(base_url: str, deployment: Deployment, calls: int) -> list[str]:
    payer = deployment.accounts[0]
    # The agent reads its token (decimals, EIP-712 name and version) from the chain, not from the gateway.
    token = await read_token_facts(deployment.rpc_url, deployment.token.address, network=deployment.network)
    agent = PayingAgent(payer.private_key, token, max_spend_atomic=1_000_000)
    lines: list[str] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        # The agent learns what is on sale, and at what price, as any agent would: GET /tools.
        on_sale = await discover(client, base_url)
        print(f"  agent discovered {len(on_sale)} tools via /tools: {', '.join(t.name for t in on_sale)}", flush=True)
        for i in range(calls):
            method, path, body = PLAN[i % len(PLAN)]
            result = await agent.call(client, method, path, json=body) if body else await agent.call(client, method, path)
            price = format_amount(result.price_atomic, deployment.token.decimals) if result.price_atomic else "-"
            tx = result.tx_hash or (result.body.get("error") if isinstance(result.body, dict) else "-")
            line = f"  {method:4} {path:36} price {price:>6} USDC  HTTP {result.status}  tx {tx}"
            print(line, flush=True)
            lines.append(line)
    print(f"  agent {payer.address} spent {format_amount(agent.spent_atomic, deployment.token.decimals)} USDC", flush=True)
    return lines


async def _serve_gateway(settings: Settings, deployment: Deployment, calls: int, serve_forever: bool) -> int:
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            return 1
        await asyncio.wait({task}, timeout=0.02)  # returns at once if the server task ends
    port = server.servers[0].sockets[0].getsockname()[1]  # the real one when settings.port is 0
    base_url = f"http://{settings.host}:{port}"
    print(f"gateway  {base_url}  (catalogs {DEFAULT_CATALOG.name}, {WAREHOUSE_CATALOG.name})", flush=True)
    print("sample agent paying for calls:", flush=True)
    await _agent_calls(base_url, deployment, calls)
    _print_ledger()
    if serve_forever:
        print(f"\nx402gw is serving at {base_url} — try: curl -i {base_url}/quotes/AAPL   (Ctrl-C to stop)", flush=True)
    else:
        server.should_exit = True
    await task
    return 0


def _print_ledger() -> None:
    url = write_pointer(DEMO_LEDGER)
    print(f"ledger   {DEMO_LEDGER.resolve()}  (every payment of this demo)", flush=True)
    print(f"export   {export_command(url)}", flush=True)
    print("         (or, in this directory, just: x402gw ledger export)", flush=True)


def run_demo(
    *, port: int = 8402, calls: int = 9, serve_forever: bool = True, anvil_path: str | None = None,
    upstream_port: int = UPSTREAM_PORT, warehouse_port: int = WAREHOUSE_PORT,
) -> int:
    """Run the demo; returns the exit code: 0 after the calls (and Ctrl-C or SIGTERM while
    serving), 1 if the gateway could not start, 2 if a port is taken or the chain cannot start."""
    for needed, what, option in ((port, "gateway", "--port"), (upstream_port, "sample upstream", "--upstream-port"),
                                 (warehouse_port, "sample SOAP warehouse", "--warehouse-port")):
        if needed and not _port_free(needed):
            print(f"error: port {needed} for the {what} is in use; stop what holds it or pass {option}", flush=True)
            return 2
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    for stale in [*DEMO_DIR.glob("ledger.sqlite3*"), DEMO_LEDGER_POINTER]:
        stale.unlink(missing_ok=True)
    # SIGTERM ends the demo as Ctrl-C does (servers and anvil stopped), not by the default action
    # that would skip every finally. uvicorn captures both while it serves and re-raises them after.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _run(port, calls, serve_forever, anvil_path, upstream_port, warehouse_port)
    except DevchainError as exc:
        print(f"error: {exc} [{exc.code}]", flush=True)
        return 2
    except KeyboardInterrupt:
        return 0  # stopped while the chain or the samples were starting: all stopped on the way out
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(port: int, calls: int, serve_forever: bool, anvil_path: str | None, upstream_port: int, warehouse_port: int) -> int:
    with Anvil(anvil_path=anvil_path) as anvil:
        deployment = setup_devchain(anvil.rpc_url)
        deployment_file = DEMO_DIR / "devchain.json"
        deployment.write(deployment_file)
        print(f"chain    {anvil.rpc_url}  (chain id {deployment.chain_id}), test USDC at {deployment.token.address}", flush=True)
        with ThreadServer(rest_upstream.create_app(), upstream_port) as upstream, \
                ThreadServer(soap_warehouse.create_app(), warehouse_port) as warehouse:
            print(f"upstream {upstream.url}  (sample legacy REST service)", flush=True)
            print(f"upstream {warehouse.url}/soap/warehouse  (sample SOAP warehouse, ?wsdl)", flush=True)
            # The samples' demo credentials, read by the gateway the way a deployment's secrets would be.
            os.environ.setdefault("WAREHOUSE_TOKEN", soap_warehouse.DEMO_TOKEN)
            os.environ.setdefault("ACME_FX_KEY", rest_upstream.DEMO_FX_KEY)
            settings = Settings(
                port=port, deployment_file=deployment_file, database_url=f"sqlite:///{DEMO_LEDGER}",
                catalog=_catalogs(upstream.url, warehouse.url),
            )
            try:
                code = asyncio.run(_serve_gateway(settings, deployment, calls, serve_forever))
            except KeyboardInterrupt:
                code = 0
        ledger = open_ledger(settings.database_url)
        settled = [p for p in ledger.all() if p.state == "settled"]
        ledger.close()
        print(f"ledger: {len(settled)} settled payments in {DEMO_LEDGER}", flush=True)
        return code
