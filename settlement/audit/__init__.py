"""The audit trail: an append-only, hash-chained record of every decision the gateway takes.

canonical (hash and redaction) ← records (tables, events, stored and exported records) ← chain
(verify) ← refund_check (records of refunds) ← ledger_check (settled records against payment rows) ← trail (the store: append, read,
verify) ← writer (the asyncio front the pipeline uses).
Sits above the ledger (its tables share the ledger's database and metadata); the ledger never
imports it.
"""

from settlement.audit.canonical import (
    HASH_VERSION,
    REDACTED,
    SECRET_FIELDS,
    canonical_json,
    clean_fields,
    iso_utc,
    plain_text,
    record_hash,
    redact_url,
)
from settlement.audit.chain import Problem, VerifyReport, verify_chain
from settlement.audit.ledger_check import (
    SETTLED,
    LedgerCheck,
    settled_disagreement,
    settled_facts,
)
from settlement.audit.records import (
    AUDIT_TABLES,
    GENESIS_HASH,
    HEAD_ID,
    AuditEvent,
    AuditHead,
    AuditRecord,
    StoredRecord,
)
from settlement.audit.refund_check import (
    REFUND_ALREADY_PAID,
    REFUND_APPROVED,
    REFUND_CONTRADICTED,
    REFUND_OWED,
    REFUND_PAID,
    REFUND_UNAUDITED,
    refund_recorded,
    refund_refusal,
)
from settlement.audit.trail import AuditTrail, create_audit_engine
from settlement.audit.writer import AuditSink, AuditWriter, DirectSink

__all__ = [
    "AUDIT_TABLES",
    "GENESIS_HASH",
    "HASH_VERSION",
    "HEAD_ID",
    "REDACTED",
    "REFUND_ALREADY_PAID",
    "REFUND_APPROVED",
    "REFUND_CONTRADICTED",
    "REFUND_OWED",
    "REFUND_PAID",
    "REFUND_UNAUDITED",
    "SECRET_FIELDS",
    "SETTLED",
    "AuditEvent",
    "AuditHead",
    "AuditRecord",
    "AuditSink",
    "AuditTrail",
    "AuditWriter",
    "DirectSink",
    "LedgerCheck",
    "Problem",
    "StoredRecord",
    "VerifyReport",
    "canonical_json",
    "clean_fields",
    "create_audit_engine",
    "iso_utc",
    "plain_text",
    "record_hash",
    "redact_url",
    "refund_recorded",
    "refund_refusal",
    "settled_disagreement",
    "settled_facts",
    "verify_chain",
]
