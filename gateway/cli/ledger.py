"""Finance and database commands: ``ledger export``, ``ledger summary``, ``reconcile``, ``db upgrade``.

The database, catalog and chains come from the same settings the gateway uses (``X402GW_*``), so
what is reconciled is what the gateway sells. Exit codes: 0 done / agree, 1 ledger and chain
disagree, 2 the command could not run (bad option, database or chain unreachable).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from gateway.cli.outputs import missing_ledger, sink
from gateway.cli.webhooks import webhooks
from gateway.settings import Settings

EXIT_DISAGREE = 1
EXIT_ERROR = 2


def _settings(**overrides: Any) -> Settings:
    from gateway.cli.settings_errors import load_settings

    # Bad settings: one line with a code, never a value (gateway.cli.settings_errors).
    return load_settings({k: v for k, v in overrides.items() if v}, exit_status=EXIT_ERROR)


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def _open_ledger(database_url: str | None) -> Any:
    """The ledger a finance command reads: one that exists. A SQLite file that does not is a
    mistyped URL, never a fresh empty ledger that reports "nothing owed, nothing to reconcile"."""
    from settlement.errors import LedgerError
    from settlement.schema import open_ledger

    url = database_url or _settings().database_url
    missing = missing_ledger(url)
    if missing is not None:
        _fail(missing)
    try:
        return open_ledger(url)
    except LedgerError as exc:
        _fail(f"{exc.message} [{exc.code}]")


def _ledger_to_read(database_url: str | None) -> str:
    """The ledger ``ledger export`` / ``summary`` read: the one given, else the gateway's default,
    else (no default file here, a demo ran here) the demo's, saying so on standard error."""
    if database_url:
        return database_url
    url = _settings().database_url
    if url != Settings.model_fields["database_url"].default:
        return url  # chosen in the environment or a settings file: never second-guessed
    from gateway.devkit.demo_ledger import choose_ledger

    choice = choose_ledger(url)
    if choice.note:
        click.echo(choice.note, err=True)
    return choice.url


def _filters(start: str | None, end: str | None, owners: tuple[str, ...], tools: tuple[str, ...],
             states: tuple[str, ...]) -> Any:
    from settlement.finance.export import ExportError, Filters, parse_when

    try:
        return Filters(
            start=parse_when(start) if start else None,
            end=parse_when(end) if end else None,
            owners=frozenset(owners), tools=frozenset(tools), states=frozenset(states),
        )
    except ExportError as exc:
        raise click.BadParameter(str(exc)) from None


database_option = click.option(
    "--database-url", envvar="X402GW_DATABASE_URL", default=None,
    help="Ledger database (default: X402GW_DATABASE_URL, else the gateway's default).",
)


def filter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--from", "start", metavar="DATE", help="From this UTC date or datetime, inclusive."),
        click.option("--to", "end", metavar="DATE",
                     help="Up to this UTC date or datetime, exclusive (--from 2025-03-01 --to 2025-04-01 is March)."),
        click.option("--owner", "owners", multiple=True, help="Only this owner (repeatable)."),
        click.option("--tool", "tools", multiple=True, help="Only this tool (repeatable)."),
    ]):
        command = option(command)
    return command


@click.group()
def ledger() -> None:
    """Read the payment ledger: exports and revenue summaries."""


@ledger.command("export")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet"]), default="csv", show_default=True)
@click.option("--output", "-o", default="-", show_default=True, help="File to write, or - for standard output.")
@filter_options
@click.option("--state", "states", multiple=True,
              type=click.Choice(["verified", "settling", "settled", "failed", "pending", "voided"]),
              help="Only payments in this state (repeatable).")
@database_option
def ledger_export(fmt: str, output: str, start: str | None, end: str | None, owners: tuple[str, ...],
                  tools: tuple[str, ...], states: tuple[str, ...], database_url: str | None) -> None:
    """One row per payment: ids, UTC time, owner, tool, payer, payTo, amount (atomic and exact
    decimal), asset, network, state, transaction, block, refunds. Streamed: flat memory."""
    from settlement.finance.export import ExportError, count, export

    filters = _filters(start, end, owners, tools, states)
    if fmt == "parquet" and output == "-" and sys.stdout.isatty():
        raise click.BadParameter("Parquet is binary: give --output FILE or redirect standard output", param_hint="--output")
    book = _open_ledger(_ledger_to_read(database_url))
    try:
        with _progress(lambda: count(book, filters)) as tick, \
                sink(output, binary=fmt == "parquet", ledger_url=str(book.engine.url)) as out:
            rows = export(book, filters, fmt, out, tick=tick)  # type: ignore[arg-type]
    except ExportError as exc:
        _fail(str(exc))
    finally:
        book.close()
    if output != "-":
        click.echo(f"{rows} payments written to {output}", err=True)


@contextmanager
def _progress(total: Callable[[], int]) -> Iterator[Callable[[int], None]]:
    """A progress bar on standard error when it is a terminal; otherwise nothing at all."""
    if not sys.stderr.isatty():
        yield lambda _: None
        return
    with click.progressbar(length=total(), label="exporting", file=sys.stderr, show_pos=True) as bar:
        yield bar.update


@ledger.command("summary")
@click.option("--by", "by", multiple=True, type=click.Choice(["owner", "tool", "day", "hour"]),
              help="Group by (repeatable, in order; default: owner and tool; days and hours are UTC).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@filter_options
@database_option
def ledger_summary(by: tuple[str, ...], fmt: str, start: str | None, end: str | None, owners: tuple[str, ...],
                   tools: tuple[str, ...], database_url: str | None) -> None:
    """Revenue per group and asset, exact decimals: gross (settled amounts), refunds (owed on
    settled payments, paid back or not) and net (gross minus refunds), as the admin dashboard shows
    it (settlement.finance.summary); gas the settlement key paid (native coin; in dollars with
    X402GW_NATIVE_USD_RATE) and net minus gas in dollars (dollar stablecoins); and counts of
    settled, failed, pending, voided and refunded payments. Different tokens are never added: each
    group is one asset on one network."""
    from settlement.finance.summary import summarize, table

    rates = _settings(database_url=database_url).native_usd_rate
    dimensions = by or ("owner", "tool")
    filters = _filters(start, end, owners, tools, ())
    book = _open_ledger(_ledger_to_read(database_url))
    try:
        groups = summarize(book, dimensions, filters)  # type: ignore[arg-type]
    finally:
        book.close()
    if fmt == "json":
        click.echo(json.dumps({"by": list(dimensions), "groups": [g.to_json(dimensions, rates) for g in groups]}, indent=2))  # type: ignore[arg-type]
    else:
        for line in table(groups, dimensions, rates):  # type: ignore[arg-type]
            click.echo(line)


@click.command("reconcile")
@click.option("--from-block", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--to-block", default=None, type=click.IntRange(min=0), help="Inclusive (default: the latest block).")
@click.option("--pay-to", "pay_to", multiple=True, help="Only this payTo address (repeatable; default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--chunk-blocks", default=5_000, show_default=True, type=click.IntRange(min=1),
              help="Blocks per eth_getLogs call (halved when the node refuses a range).")
@click.option("--catalog", "catalogs", multiple=True, type=click.Path(path_type=Path),
              help="Catalog file (repeatable; default: X402GW_CATALOG).")
@database_option
def reconcile(from_block: int, to_block: int | None, pay_to: tuple[str, ...], as_json: bool, chunk_blocks: int,
              catalogs: tuple[Path, ...], database_url: str | None) -> None:
    """Resolve open payments, then compare the ledger with the token's Transfer / AuthorizationUsed
    logs for each payTo: exit 0 when they agree, 1 when they do not, 2 when it cannot tell."""
    from gateway.app import facilitator_plan, write_ahead_networks
    from settlement.finance.reconcile import reconcile as run_reconcile
    from settlement.schemes import Schemes
    from settlement.schemes.exact_permit2 import permit2_resolvers
    from settlement.schemes.upto import build_upto

    if to_block is not None and to_block < from_block:
        raise click.BadParameter("--to-block is before --from-block", param_hint="--to-block")
    settings = _settings(catalog=list(catalogs), database_url=database_url)
    loaded, chains = _chains(settings)
    networks = {offer.terms.network for tool in loaded.tools for offer in tool.offers}
    plan = facilitator_plan(settings, networks)
    assets = {(o.terms.network, o.terms.asset, o.terms.pay_to) for t in loaded.tools for o in t.offers}
    book = _open_ledger(settings.database_url)
    _write_webhook_events(book, settings)

    write_ahead = write_ahead_networks(plan)
    resolvers: list[Any] = permit2_resolvers(chains, write_ahead)
    upto = build_upto({n: c for n, c in chains.items() if n in write_ahead}, settings.deployment_file)
    if upto is not None:  # open upto rows (their hash always written ahead) resolve here too
        resolvers.append(upto)
    async def work() -> Any:
        found = await run_reconcile(book, dict(chains), pay_to=pay_to, assets=assets, from_block=from_block,
                                    to_block=to_block, schemes=Schemes(resolvers), chunk=chunk_blocks)
        await _owe_lost_answers(book, settings, found.resolved)
        return found

    report = _on_chains(book, chains, work())
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for line in _describe(report):
            click.echo(line)
    if report.unchecked_networks:  # the ledger has payments on a network we cannot read: cannot tell
        click.echo(f"error: no RPC URL for {', '.join(report.unchecked_networks)} (X402GW_RPC_URLS)", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(0 if report.agree else EXIT_DISAGREE)


async def _owe_lost_answers(book: Any, settings: Settings, resolved: list[dict[str, Any]]) -> None:
    """An ``upfront`` payment this command settled from ``pending`` (its request answered 503 before
    the settlement was final) with no answer: its refund is owed now, as the gateway's own resolver
    would (paid by ``ledger refunds --pay``). One settled from ``settling`` belongs to a live request,
    or to a dead process whose restart owes it (``Refunds.owe_lost_answers``)."""
    from gateway.pipeline.refunds import Refunds
    from gateway.store import create_store
    from settlement.audit import AuditTrail, DirectSink
    from settlement.ledger.resolve import Resolution

    settled = [Resolution(**r) for r in resolved if r["before"] == "pending"]
    if not settled:
        return
    store = create_store(settings.redis_url, settings.redis_prefix)  # a replica's live resend holds its lock there
    audit = DirectSink(AuditTrail(book.url))  # each refund owed is named in the trail: `ledger refunds --pay` asks
    try:
        for payment_id in await Refunds(book, None, audit).owe_lost_answers(store, settled):
            click.echo(f"payment {payment_id}: settled with no answer (upfront): its refund is owed (ledger refunds --pay)",
                       err=True)
    finally:
        await store.close()
        await audit.close()


def _write_webhook_events(book: Any, settings: Settings) -> None:
    """Payments this command resolves write their webhook events, as the gateway's would; the
    gateway's dispatcher sends them (this command reads no webhook secret)."""
    from gateway.errors import GatewayConfigError
    from gateway.ops.webhooks import endpoints_from_settings
    from gateway.ops.webhooks.config import subscriptions_of

    try:
        endpoints = endpoints_from_settings(settings.webhooks, secrets=False)
    except GatewayConfigError as exc:
        _fail(f"{exc.message} [{exc.code}]")
    book.subscriptions = subscriptions_of(endpoints) if endpoints else None


def _on_chains(book: Any, chains: dict[str, Any], work: Coroutine[Any, Any, Any]) -> Any:
    """Run ``work`` against ``chains``, then close the chains and the ledger whatever happened; a
    node that stops answering ends the command with its code (exit 2)."""
    from settlement.errors import ChainUnavailable

    async def run() -> Any:
        try:
            return await work
        finally:
            for chain in chains.values():
                await chain.close()

    try:
        return asyncio.run(run())
    except ChainUnavailable as exc:
        _fail(f"{exc.message} [{exc.code}]")
    finally:
        book.close()


def _chains(settings: Settings, *, keyed: bool = False) -> tuple[Any, dict[str, Any]]:
    """The catalogs, and chain access for every network they sell on and every network of
    X402GW_RPC_URLS (the ledger may hold networks the catalog no longer sells); exits when a sold
    network has none. ``keyed``: networks this gateway settles itself get their settlement key
    (so its address is known), as the gateway builds them; otherwise read-only."""
    from catalog import CatalogError, load_catalogs
    from gateway.app import GatewayConfigError, build_chains, facilitator_plan, write_ahead_networks
    from settlement.chain.client import JsonRpcChain

    try:  # the catalog as `serve` reads it: ${NAME} from this environment
        loaded = load_catalogs(settings.catalog, env=os.environ)
    except CatalogError as exc:
        _fail(f"the catalog is invalid\n{exc}")
    networks = {offer.terms.network for tool in loaded.tools for offer in tool.offers}
    try:
        local = write_ahead_networks(facilitator_plan(settings, networks)) if keyed else set()
        chains: dict[str, JsonRpcChain] = dict(build_chains(settings, loaded, local_networks=local))
    except GatewayConfigError as exc:
        _fail(f"{exc} [{exc.code}]")
    for network, url in settings.rpc_urls.items():
        if network not in chains and network.startswith("eip155:"):
            chains[network] = JsonRpcChain(url, int(network.split(":", 1)[1]), None)
    for network in sorted(networks - set(chains)):
        hint = f" or start `x402gw devchain` (no deployment at {settings.deployment_file})" if network == "eip155:31337" else ""
        _fail(f"no chain access for {network}: set X402GW_RPC_URLS='{{\"{network}\": \"https://...\"}}'{hint}")
    return loaded, chains


@ledger.command("backfill-gas")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--catalog", "catalogs", multiple=True, type=click.Path(path_type=Path),
              help="Catalog file (repeatable; default: X402GW_CATALOG).")
@database_option
def ledger_backfill_gas(as_json: bool, catalogs: tuple[Path, ...], database_url: str | None) -> None:
    """Record the gas of settled and failed rows that lack it (settled before the gas columns, by
    a remote facilitator, or resolved by a reconcile), read from each transaction's receipt; a
    batch's gas is shared exactly among its rows (settlement.chain.gas). Only transactions sent by
    the network's settlement key count (a remote facilitator's are listed, not recorded). Exit 2 when a network has
    no chain access or a node stops answering (run it again: filled rows are kept)."""
    from settlement.finance.gas import backfill_gas

    settings = _settings(catalog=list(catalogs), database_url=database_url)
    _, chains = _chains(settings, keyed=True)
    book = _open_ledger(settings.database_url)

    senders = {n: c.settlement_address for n, c in chains.items() if c.settlement_address}
    report = _on_chains(book, chains, backfill_gas(book, chains, senders))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(f"gas recorded for {report.filled} payments ({report.transactions} receipts read)")
        for tx_hash in report.no_receipt:
            click.echo(f"no receipt (never mined): {tx_hash}")
        for tx_hash in report.no_gas:
            click.echo(f"receipt without gasUsed/effectiveGasPrice: {tx_hash}")
        for tx_hash in report.other_sender:
            click.echo(f"sent by another account than the settlement key (not ours to count): {tx_hash}")
    if report.unchecked_networks:
        click.echo(f"error: no RPC URL for {', '.join(report.unchecked_networks)} (X402GW_RPC_URLS)", err=True)
        sys.exit(EXIT_ERROR)


def _describe(report: Any) -> list[str]:
    lines = [
        f"ranges: {json.dumps(report.ranges)}; payTo: {', '.join(report.pay_to) or '-'}",
        f"resolved open payments: {len(report.resolved)}",
        (f"ledger settled: {report.ledger_settled}, chain EIP-3009 payments: {report.chain_payments}, "
         f"matched: {report.matched}, other transfers to payTo: {report.chain_other_transfers}"),
    ]
    from settlement.finance.reconcile import DISAGREEMENTS

    for kind in DISAGREEMENTS:
        for item in getattr(report, kind):
            ident = item.get("payment_id", item.get("tx_hash"))
            lines.append(f"{kind}: {ident} {json.dumps(item, separators=(',', ':'))}")
    if report.unchecked_networks:
        lines.append(f"not checked (no RPC URL): {', '.join(report.unchecked_networks)}")
    lines.append("agree" if report.agree else "DISAGREE")
    return lines


@click.group()
def db() -> None:
    """The ledger database schema (Alembic migrations, shipped with the package)."""


@db.command("upgrade")
@database_option
def db_upgrade(database_url: str | None) -> None:
    """Bring the ledger database to the latest schema (creates it when empty)."""
    from sqlalchemy.exc import SQLAlchemyError

    from settlement.errors import LedgerError
    from settlement.ledger import create_ledger_engine
    from settlement.schema import current_revision, head_revision, migrate

    url = database_url or _settings().database_url
    try:
        engine = create_ledger_engine(url)
    except SQLAlchemyError as exc:  # an unparsable URL (ArgumentError)
        _fail(f"the database URL cannot be used ({type(exc).__name__}) [invalid_setting]")
    try:
        outcome = migrate(engine)
        with engine.connect() as conn:
            revision = current_revision(conn)
    except SQLAlchemyError as exc:
        _fail(f"cannot migrate the ledger database ({type(exc).__name__})")
    except LedgerError as exc:  # a ledger of a newer x402gw
        _fail(f"{exc.message} [{exc.code}]")
    finally:
        engine.dispose()
    click.echo(f"ledger schema {outcome}: revision {revision} (head {head_revision()})")


COMMANDS = (ledger, reconcile, db, webhooks)  # webhooks list / replay: gateway.cli.webhooks
