"""The ledger's reads (``Ledger`` inherits them): rows by id, request, authorization or
payment-identifier, the open ones, all of them, a payment's stored answer, and the latest payment
a payer made for a tool (re-access). Nothing here writes.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Table, bindparam, func, select
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.orm import Session, configure_mappers

from settlement.ledger.group_commit import atomic_alone
from settlement.ledger.models import OPEN_STATES, Payment, PaymentState, StoredResponse
from settlement.ledger.statements import HotStatements

__all__ = ["LedgerReads"]


_NEW_PAYMENT = Payment.__mapper__.class_manager.new_instance


def _payment(mapping: RowMapping | dict[str, Any]) -> Payment:
    """A detached ``Payment`` from a Core row (the same attributes the ORM would load): the ORM's
    own instance with its attributes set as a load sets them, without the constructor's change
    tracking (it is never added to a session), at a thirtieth of the constructor's cost; the paid
    path makes two per call."""
    if not Payment.__mapper__.configured:
        configure_mappers()  # what the constructor would do first: the attributes' loaders
    row: Payment = _NEW_PAYMENT()
    row.__dict__.update(mapping)
    return row


_PAYMENTS: Table = Payment.__table__  # type: ignore[assignment]  # declarative tables are Tables
_AUTHORIZATION_KEY = (
    _PAYMENTS.c.network == bindparam("network"),
    _PAYMENTS.c.asset == bindparam("asset"),
    _PAYMENTS.c.payer == bindparam("payer"),
    _PAYMENTS.c.nonce == bindparam("nonce"),
)
_BY_AUTHORIZATION = select(_PAYMENTS).where(*_AUTHORIZATION_KEY)
_ID_BY_AUTHORIZATION = select(_PAYMENTS.c.id).where(*_AUTHORIZATION_KEY)


class LedgerReads:
    # Provided by ``Ledger``: its hot statements, and one transaction, shared with a group commit on SQLite.
    _hot: HotStatements

    def _connection(self, *, one_statement: bool = False) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _session(self) -> AbstractContextManager[Session]:
        raise NotImplementedError

    @atomic_alone
    def stored_response(self, payment_id: int) -> tuple[int, list[tuple[str, str]], bytes] | None:
        with self._session() as session:
            row = session.get(StoredResponse, payment_id)
            if row is None:
                return None
            return row.status, [(str(k), str(v)) for k, v in json.loads(row.headers)], bytes(row.body)

    @atomic_alone
    def by_payment_identifier(self, identifier: str) -> Payment | None:
        with self._session() as session:
            return session.scalars(select(Payment).where(Payment.payment_identifier == identifier)).one_or_none()

    def open_payments(self) -> list[Payment]:
        """Rows whose outcome is not final: ``settling`` or ``pending``."""
        with self._session() as session:
            return list(
                session.scalars(
                    select(Payment).where(Payment.state.in_([s.value for s in OPEN_STATES])).order_by(Payment.id)
                )
            )

    @atomic_alone
    def get(self, payment_id: int) -> Payment | None:
        with self._session() as session:
            return session.get(Payment, payment_id)

    def by_request_id(self, request_id: str) -> Payment | None:
        with self._session() as session:
            return session.scalars(select(Payment).where(Payment.request_id == request_id)).one_or_none()

    @atomic_alone
    def by_authorization(self, network: str, asset: str, payer: str, nonce: str) -> Payment | None:
        key = {"network": network, "asset": asset, "payer": payer, "nonce": nonce}
        with self._connection(one_statement=True) as connection:  # reads only
            # A fresh authorization (the paid path's usual case) has no row: the driver's cursor
            # answers that; a row found is read again through SQLAlchemy, which types its columns.
            cursor = self._hot.get(_ID_BY_AUTHORIZATION).execute(connection, key)
            seen = cursor.fetchone()
            cursor.close()
            if seen is None:
                return None
            found = connection.execute(_BY_AUTHORIZATION, key).one_or_none()
        return None if found is None else _payment(found._mapping)

    def all(self) -> list[Payment]:
        with self._session() as session:
            return list(session.scalars(select(Payment).order_by(Payment.id)))

    @atomic_alone
    def latest_paid(self, payer: str, tool: str, fingerprint: str | None, *, owner: str | None = None,
                    pay_to: Collection[str] = ()) -> Payment | None:
        """The latest settled payment of ``payer`` for ``tool`` (and, unless ``fingerprint`` is
        None, for that very request) that moved money and owes nothing back: what a re-access
        stands on. Moved money: an amount above 0 and the transaction that moved it (every scheme
        records one on a settled row: exact's transfer, upto's settle, a batch's or a channel's
        claim, which is what turns an accrued voucher's ``settling`` row ``settled``); an upto
        charge of 0 settles with neither and buys nothing again. The ledger is the only record of
        it, so there is nothing beside it to drift. ``owner`` and ``pay_to``: only a payment to this
        owner, to one of these addresses (a tool's name may have been another owner's, in another
        catalog or on another replica during a rollout)."""
        query = select(_PAYMENTS).where(
            _PAYMENTS.c.payer.in_({payer, payer.lower()}),  # indexed; rows carry the checksummed form
            _PAYMENTS.c.tool == tool,
            _PAYMENTS.c.state == PaymentState.SETTLED.value,
            _PAYMENTS.c.refund_owed.is_(None),
            _PAYMENTS.c.amount != 0,  # amounts are never negative
            _PAYMENTS.c.tx_hash.is_not(None),
            _PAYMENTS.c.tx_hash != "",
        )
        if fingerprint is not None:
            query = query.where(_PAYMENTS.c.fingerprint == fingerprint)
        if owner is not None:
            query = query.where(_PAYMENTS.c.owner == owner)
        if pay_to:
            query = query.where(func.lower(_PAYMENTS.c.pay_to).in_({address.lower() for address in pay_to}))
        with self._connection() as connection:
            found = connection.execute(query.order_by(_PAYMENTS.c.created_at.desc(), _PAYMENTS.c.id.desc()).limit(1)).first()
        return None if found is None else _payment(found._mapping)
