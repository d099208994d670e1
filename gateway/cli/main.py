"""The ``x402gw`` command: serve, devchain, demo, catalog validate."""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from catalog import CatalogError, load_catalogs
from gateway.cli.agent import agent
from gateway.cli.audit import audit
from gateway.cli.batch_settlers import deploy_batch_settlers
from gateway.cli.doctor import doctor
from gateway.cli.ledger import COMMANDS, ledger
from gateway.cli.receipt import receipt
from gateway.cli.refunds import refunds

if TYPE_CHECKING:
    from gateway.settings import Settings


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)


@click.group()
@click.version_option(package_name="x402gw", prog_name="x402gw")
def main() -> None:
    """x402gw: sell calls to your APIs to AI agents, paid per call over x402."""


@main.command()
@click.option("--catalog", "catalogs", multiple=True, type=click.Path(path_type=Path), help="Catalog file (repeatable).")
@click.option("--host", default=None, help="Interface to listen on (default 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Port to listen on (default 8402).")
@click.option("--workers", default=1, show_default=True, type=int, envvar="X402GW_WORKERS",
              help="Gateway processes sharing the port (more than 1: Redis, PostgreSQL and one settlement key each).")
@click.option("--settlement-keys-file", default=None, type=click.Path(path_type=Path),
              envvar="X402GW_SETTLEMENT_KEYS_FILE", help="One settlement key per line, one per worker (--workers > 1).")
@click.option("--worker-fd", default=None, type=int, hidden=True)  # a worker's inherited listening socket
def serve(catalogs: tuple[Path, ...], host: str | None, port: int | None, workers: int,
          settlement_keys_file: Path | None, worker_fd: int | None) -> None:
    """Run the gateway."""
    import uvicorn

    from gateway.app import GatewayConfigError, create_app, describe
    from gateway.cli.settings_errors import load_settings
    from gateway.cli.startup import RefusesAtStartUp, refusal_line

    overrides: dict[str, object] = {}
    if catalogs:
        overrides["catalog"] = list(catalogs)
    if host:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = load_settings(overrides)  # bad settings: one line with a code, exit 2, no value echoed
    _configure_logging(settings.log_level)
    if worker_fd is None and workers != 1:
        sys.exit(_supervise(settings, catalogs, workers, settlement_keys_file))
    try:
        app = create_app(settings)
    except CatalogError as exc:
        click.echo(f"error: the catalog is invalid; the gateway will not start\n{exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # one line, never str(exc) of the unexpected (it may quote a secret URL)
        if not isinstance(exc, GatewayConfigError):
            logging.getLogger("x402gw").debug("start-up failed", exc_info=True)
        click.echo(refusal_line(exc), err=True)  # a SettlementError's code (ledger_unavailable...), else startup_failed
        sys.exit(2)
    click.echo(f"x402gw serving on http://{settings.host}:{settings.port}")
    for line in describe(app):
        click.echo(line)
    # What is built by now (modules, catalog, app) lives as long as the process: frozen out of the
    # collector's full passes, which would otherwise walk all of it and stop the loop for 100+ ms.
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(
        RefusesAtStartUp(app), host=settings.host, port=settings.port, loop="auto", http="auto", access_log=False,
        log_level=settings.log_level.lower(),
    )
    if worker_fd is None:
        uvicorn.Server(config).run()
    else:  # one of --workers N: accept on the supervisor's socket
        import socket

        uvicorn.Server(config).run(sockets=[socket.socket(fileno=worker_fd)])


def _supervise(settings: Settings, catalogs: tuple[Path, ...], workers: int, keys_file: Path | None) -> int:
    """``serve --workers N``: check the configuration can be shared, bind the port, run the workers."""
    from gateway.app import facilitator_plan, write_ahead_networks
    from gateway.cli.workers import WorkerPlanError, listening_socket, plan_workers, read_keys, supervise, worker_argv
    from settlement.chain.deployment import local_tokens

    try:
        loaded = load_catalogs(settings.catalog, local=local_tokens(settings.deployment_file), env=os.environ)
    except CatalogError as exc:
        click.echo(f"error: the catalog is invalid; the gateway will not start\n{exc}", err=True)
        return 2
    networks = {offer.terms.network for tool in loaded.tools for offer in tool.offers}
    settles_locally = bool(write_ahead_networks(facilitator_plan(settings, networks)))
    try:
        schemes = frozenset(offer.terms.scheme for tool in loaded.tools for offer in tool.offers)
        envs = plan_workers(settings, workers, read_keys(keys_file), settles_locally, schemes)
        sock = listening_socket(settings.host, settings.port)
    except WorkerPlanError as exc:
        click.echo(f"error: {exc.message} [{exc.code}]", err=True)
        return 2
    except OSError as exc:
        click.echo(f"error: cannot listen on {settings.host}:{settings.port}: {exc.strerror} [address_unavailable]",
                   err=True)
        return 2
    click.echo(f"x402gw serving on http://{settings.host}:{settings.port} with {workers} workers")
    shared = (settings.redis_url, settings.redis_prefix) if settings.redis_url else None
    return supervise(worker_argv(catalogs), sock, envs, shared)


@main.command()
@click.option("--port", default=8545, show_default=True, help="Anvil port on 127.0.0.1.")
@click.option("--deployment", default="var/devchain.json", show_default=True, type=click.Path(path_type=Path))
@click.option("--anvil", "anvil_path", default=None, envvar="X402GW_ANVIL_PATH", help="Path to the anvil binary.")
@click.option("--rehearse", "rehearse", default=None, metavar="NETWORK",
              help="Imitate a real network (e.g. base-sepolia): its chain id, the test token at its USDC address.")
def devchain(port: int, deployment: Path, anvil_path: str | None, rehearse: str | None) -> None:
    """Start anvil (chain id 31337), deploy the test USDC, fund accounts 1-9; Ctrl-C stops it."""
    if rehearse:
        from gateway.devkit.rehearsal import run_rehearsal

        sys.exit(run_rehearsal(rehearse, port=port, deployment_path=deployment, anvil_path=anvil_path, echo=click.echo))
    from gateway.devkit.devchain import run_devchain

    sys.exit(run_devchain(port=port, deployment_path=deployment, anvil_path=anvil_path, echo=click.echo))


@main.command()
@click.option("--port", default=8402, show_default=True, help="Gateway port.")
@click.option("--calls", default=9, show_default=True, help="Paid calls the sample agent makes (the plan has 9: REST and SOAP).")
@click.option("--exit-after-calls", is_flag=True, help="Stop after the agent's calls instead of serving on.")
@click.option("--anvil", "anvil_path", default=None, envvar="X402GW_ANVIL_PATH", help="Path to the anvil binary.")
@click.option("--upstream-port", default=9101, show_default=True, help="Port of the sample REST upstream (0: a free one).")
@click.option("--warehouse-port", default=9102, show_default=True, help="Port of the sample SOAP warehouse (0: a free one).")
def demo(port: int, calls: int, exit_after_calls: bool, anvil_path: str | None, upstream_port: int, warehouse_port: int) -> None:
    """Local chain + token + sample upstream + gateway, and an agent making paid calls."""
    from gateway.devkit.demo import run_demo

    sys.exit(run_demo(port=port, calls=calls, serve_forever=not exit_after_calls, anvil_path=anvil_path,
                      upstream_port=upstream_port, warehouse_port=warehouse_port))


@main.group()
def catalog() -> None:
    """Work with catalog files."""


@catalog.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--check-chain", "rpc_urls", multiple=True, metavar="RPC",
              help="Read each offered token on the chain this RPC serves; refuse a name, version or decimals mismatch (repeatable).")
@click.option("--deployment", default="var/devchain.json", show_default=True, envvar="X402GW_DEPLOYMENT_FILE",
              type=click.Path(path_type=Path), help="The dev chain's deployment file (asset: USDC on the local chain).")
def catalog_validate(files: tuple[Path, ...], rpc_urls: tuple[str, ...], deployment: Path) -> None:
    """Check catalog files and print the offers they make; exit 1 and name file, field and line for every problem."""
    from gateway.cli.catalog_check import check_chain, describe_offers
    from settlement.chain.deployment import local_tokens

    # Only a regular file: Deployment.read of a FIFO or /dev/zero would block or fill the memory.
    local = local_tokens(deployment) if deployment.is_file() else None
    try:  # ${NAME} in the files reads this environment: the offers printed are this environment's
        catalogs = load_catalogs(files, local=local, env=os.environ)
    except CatalogError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    for line in describe_offers(catalogs, local):
        click.echo(line)
    if rpc_urls and not check_chain(catalogs, rpc_urls, click.echo):
        sys.exit(1)


main.add_command(audit)
main.add_command(doctor)  # is this configuration ready to take payments?


for _command in COMMANDS:  # ledger export / summary, reconcile, db upgrade
    main.add_command(_command)
ledger.add_command(refunds)  # ledger refunds [--pay]: owed refunds, paid later (gateway.cli.refunds)


main.add_command(agent)  # the reference agent: discover, pay within a limit, print the receipt
main.add_command(receipt)  # receipt verify: a gateway-signed receipt checked offline
main.add_command(deploy_batch_settlers)  # one BatchSettler per settlement account (batched, --workers)


if __name__ == "__main__":
    main()
