"""The audit trail: an append-only, hash-chained record of every decision the gateway takes.

canonical (hash and redaction) ← records (tables, events, stored and exported records) ← chain
(verify) ← trail (the store: append, read, verify) ← writer (the asyncio front the pipeline uses).
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
    record_hash,
    redact_url,
)
from settlement.audit.chain import Problem, VerifyReport, verify_chain
from settlement.audit.records import (
    AUDIT_TABLES,
    GENESIS_HASH,
    HEAD_ID,
    AuditEvent,
    AuditHead,
    AuditRecord,
    StoredRecord,
)
from settlement.audit.trail import AuditTrail, create_audit_engine
from settlement.audit.writer import AuditSink, AuditWriter

__all__ = [
    "AUDIT_TABLES",
    "GENESIS_HASH",
    "HASH_VERSION",
    "HEAD_ID",
    "REDACTED",
    "SECRET_FIELDS",
    "AuditEvent",
    "AuditHead",
    "AuditRecord",
    "AuditSink",
    "AuditTrail",
    "AuditWriter",
    "Problem",
    "StoredRecord",
    "VerifyReport",
    "canonical_json",
    "clean_fields",
    "create_audit_engine",
    "iso_utc",
    "record_hash",
    "redact_url",
    "verify_chain",
]
