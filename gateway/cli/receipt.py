"""``x402gw receipt verify FILE``: check a gateway-signed receipt offline; ``x402gw receipt export``:
every settled payment's receipt, as JSON lines.

The file holds the receipt as JSON (``{"format": "eip712", "payload": {...}, "signature": "0x..."}``,
what ``GET /receipts/{paymentId}`` answers) or the ``X402GW-Receipt`` header's base64 value. The
signature must recover to the gateway's published receipt signer (``receipts.signer`` in its
``/.well-known/x402``), given with ``--signer``. Exit codes: 0 valid (the fields are printed),
1 invalid (tampered, or signed by another key), 2 the file cannot be read as a receipt.

``export`` derives the receipts from the ledger with the gateway's settings (``X402GW_RECEIPT_KEY``
or its local-chain default, ``X402GW_PUBLIC_URL``), so each line is byte for byte what the gateway
served and serves: one ``{"paymentId", "receipt"}`` object per settled payment, in id order.
Exit codes: 0 written, 2 no receipt key for these networks or the ledger unreadable.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from pathlib import Path
from typing import Any

import click

from catalog.source import read_catalog_text

EXIT_INVALID = 1
EXIT_UNREADABLE = 2


def _read(path: Path) -> Any:
    text = read_catalog_text(str(path)).strip()  # a regular file only: a FIFO would wait for ever
    if text.startswith("{"):
        return json.loads(text)
    return json.loads(base64.b64decode(text, validate=True))


@click.group()
def receipt() -> None:
    """Signed payment receipts."""


@receipt.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--signer", required=True, help="The gateway's receipt signer address (receipts.signer in /.well-known/x402).")
@click.option("--json", "as_json", is_flag=True, help="Print the verified fields as JSON.")
def verify(file: Path, signer: str, as_json: bool) -> None:
    """Check FILE's signature against the gateway's receipt signer and print what it attests."""
    from settlement.finance.receipts import ReceiptInvalid, recover_receipt_signer

    try:
        signed = _read(file)
    except (OSError, UnicodeDecodeError, ValueError, binascii.Error):
        click.echo(f"error: {file} is not a receipt (JSON or base64 JSON) [receipt_unreadable]", err=True)
        sys.exit(EXIT_UNREADABLE)
    try:
        recovered = recover_receipt_signer(signed)
    except ReceiptInvalid as exc:
        click.echo(f"invalid: {exc.message} [{exc.code}]", err=True)
        sys.exit(EXIT_INVALID)
    if recovered.lower() != signer.lower():
        click.echo(f"invalid: signed by {recovered}, not by the gateway's receipt signer {signer} "
                   "[receipt_signer_mismatch]", err=True)
        sys.exit(EXIT_INVALID)
    payload = signed["payload"]
    if as_json:
        click.echo(json.dumps({"valid": True, "signer": recovered, "payload": payload}, indent=2))
        return
    click.echo(f"valid: signed by {recovered}")
    for name, value in payload.items():
        click.echo(f"  {name:16} {value}")


@receipt.command("export")
@click.option("--payer", "payers", multiple=True, help="Only this payer's receipts (repeatable).")
@click.option("--payment-id", "payment_ids", multiple=True, type=click.IntRange(1, 2**63 - 1), help="Only this payment (repeatable).")
@click.option("--output", "-o", default="-", show_default=True, help="File to write, or - for standard output.")
@click.option("--database-url", default=None, help="The ledger (default: X402GW_DATABASE_URL or the gateway's).")
def export(payers: tuple[str, ...], payment_ids: tuple[int, ...], output: str, database_url: str | None) -> None:
    """Signed receipts of settled payments, one JSON object a line."""
    from gateway.cli.ledger import _ledger_to_read, _open_ledger, _settings
    from gateway.cli.outputs import sink
    from gateway.errors import GatewayConfigError
    from gateway.surfaces.receipts import receipt_signer
    from settlement.finance.receipts import settled_payments

    settings = _settings()
    book = _open_ledger(_ledger_to_read(database_url))
    try:
        networks = {p.network for p in settled_payments(book, payers=payers, payment_ids=payment_ids)}
        try:
            signer = receipt_signer(settings, networks)
        except GatewayConfigError as exc:
            click.echo(f"error: {exc} [{exc.code}]", err=True)
            sys.exit(EXIT_UNREADABLE)
        if signer is None:
            click.echo("error: no receipt key for these networks: set X402GW_RECEIPT_KEY [receipt_key_missing]", err=True)
            sys.exit(EXIT_UNREADABLE)
        written = 0
        with sink(output, ledger_url=str(book.engine.url)) as out:  # never over the ledger, a FIFO or a device
            for payment in settled_payments(book, payers=payers, payment_ids=payment_ids):
                line = {"paymentId": payment.id, "receipt": signer.receipt(payment, settings.public_url)}
                out.write(json.dumps(line, separators=(",", ":")) + "\n")
                written += 1
    finally:
        book.close()
    click.echo(f"{written} receipts (signer {signer.address})", err=True)
