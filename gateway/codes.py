"""Every refusal code the gateway answers with: its HTTP status and the agent's next step, in one table.

Codes are stable snake_case strings (agents switch on them), so each is a constant here and
``REFUSALS`` says, for each, the status it is answered with and the kind of ``next`` step its body
carries. ``gateway.errors`` derives a refusal's default status and its ``next`` from this table;
tests/gateway/test_codes.py holds every code raised in gateway/ to it.

Kinds of next step (the ``next.action`` an agent reads; timing fields can turn most kinds into
``retry`` (``retryAfter``) or ``wait_until`` (``resetsAt``), see ``gateway.errors.next_step``):

    pay             402: sign the offer in PAYMENT-REQUIRED (or structuredContent over MCP)
    fix_arguments   the arguments or body are wrong: ``fields`` names them
    fix_payment     the payment header is malformed: rebuild it from the offer
    new_payment     this authorization or payment-identifier is spent: sign a fresh one
    retry           transient: resend after ``retryAfter`` seconds (``same_payment``: the same one)
    wait_until      a budget or limit resets at ``resetsAt``
    use_method      another HTTP method is allowed here
    discover        nothing is sold here: see /tools
    another_tool    this tool is off for now: discover another, or retry the same payment later
    none            nothing the agent can do (blocked, or an error on our side)

Codes not in the table (a catalog failure rule's own code, a remote facilitator's reason inside a
402) are answered with the status their raiser gives and a next step derived from status and
prefix alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

__all__ = [
    "FIX_PAYMENT_PREFIXES",
    "NEXT_KINDS",
    "REFUSALS",
    "SETTLEMENT_REASONS",
    "NextKind",
    "Refusal",
    "refusal",
]

NextKind = Literal[
    "pay", "fix_arguments", "fix_payment", "new_payment", "retry", "wait_until", "use_method", "discover",
    "another_tool", "none",
]
NEXT_KINDS: Final[frozenset[str]] = frozenset(NextKind.__args__)  # type: ignore[attr-defined]

# Codes of a malformed payment (the settlement codec's and the payload checks'): rebuild it.
FIX_PAYMENT_PREFIXES: Final = (
    "payment_header_", "invalid_payload", "invalid_exact_evm_payload", "invalid_x402_version",
    "invalid_payment_identifier", "invalid_permit2_payload",
)


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str
    status: int
    next: NextKind
    same_payment: bool = False  # a retry may resend the very same payment (nothing was spent)


# -- routing and the request itself -------------------------------------------------------------
NOT_FOUND: Final = "not_found"
METHOD_NOT_ALLOWED: Final = "method_not_allowed"
INVALID_ARGUMENTS: Final = "invalid_arguments"
INVALID_PARAMETER: Final = "invalid_parameter"
INVALID_JSON_BODY: Final = "invalid_json_body"
# A tool priced by a rule (catalog.price_rules): these arguments' price is above the tool's
# maximum, or none (no tier holds the count, 0, beyond any token amount). Ask for less.
PRICE_ABOVE_MAX: Final = "price_above_max"
PRICE_OUT_OF_RANGE: Final = "price_out_of_range"
DUPLICATE_JSON_KEY: Final = "duplicate_json_key"
BODY_NOT_ALLOWED: Final = "body_not_allowed"
REQUEST_TOO_LARGE: Final = "request_too_large"
REQUEST_BODY_TIMEOUT: Final = "request_body_timeout"  # the body had not all arrived after BODY_SECONDS
REQUEST_HEADERS_TOO_LARGE: Final = "request_headers_too_large"
INVALID_RANGE: Final = "invalid_range"
ADMIN_UNAUTHORIZED: Final = "admin_unauthorized"
# -- tool search (GET /tools?q=, MCP search_tools) ------------------------------------------------
SEARCH_QUERY_INVALID: Final = "search_query_invalid"
SEARCH_LIMIT_INVALID: Final = "search_limit_invalid"
SEARCH_BUDGET_INVALID: Final = "search_budget_invalid"
# -- answers sized to a budget (x402gw_* query parameters, gateway.upstream.trimming) --------------
ANSWER_FIELDS_INVALID: Final = "answer_fields_invalid"
ANSWER_LIMIT_INVALID: Final = "answer_limit_invalid"
ANSWER_PARAMETER_INVALID: Final = "answer_parameter_invalid"
ANSWER_TRIMMING_NOT_OFFERED: Final = "answer_trimming_not_offered"
# -- the payment ----------------------------------------------------------------------------------
PAYMENT_REQUIRED: Final = "payment_required"
PAYMENT_REQUIREMENTS_MISMATCH: Final = "payment_requirements_mismatch"
PAYMENT_WINDOW_TOO_SHORT: Final = "payment_window_too_short"
SETTLEMENT_FAILED: Final = "settlement_failed"
INVALID_X402_VERSION: Final = "invalid_x402_version"
INVALID_PAYLOAD: Final = "invalid_payload"
INVALID_PAYMENT: Final = "invalid_payment"
INVALID_EXACT_EVM_PAYLOAD: Final = "invalid_exact_evm_payload"
INVALID_EXACT_EVM_PAYLOAD_SIGNATURE: Final = "invalid_exact_evm_payload_signature"
# The signed authorization does not pay this offer (checked at decode, whoever verifies): x402's codes.
RECIPIENT_MISMATCH: Final = "invalid_exact_evm_payload_recipient_mismatch"
VALUE_MISMATCH: Final = "invalid_exact_evm_payload_authorization_value_mismatch"
INVALID_PERMIT2_SIGNATURE: Final = "invalid_permit2_signature"  # upto: not from's over its Permit2 authorization
# batch-settlement (settlement.schemes.channels), offline in decode_and_bind, as the x402 SDK names them
CHANNEL_ID_MISMATCH: Final = "invalid_batch_settlement_evm_channel_id_mismatch"  # voucher.channelId is not its config's
VOUCHER_SIGNATURE_INVALID: Final = "invalid_batch_settlement_evm_voucher_signature"  # not the payer authorizer's
CHANNEL_REFUND_UNAVAILABLE: Final = "channel_refund_unavailable"  # a refund request where no channel scheme serves
INVALID_PAYMENT_IDENTIFIER: Final = "invalid_payment_identifier"
INVALID_PAYMENT_REQUIREMENTS: Final = "invalid_payment_requirements"
PAYMENT_HEADER_TOO_LARGE: Final = "payment_header_too_large"
PAYMENT_HEADER_NOT_BASE64: Final = "payment_header_not_base64"
PAYMENT_HEADER_NOT_JSON: Final = "payment_header_not_json"
PAYMENT_HEADER_NOT_OBJECT: Final = "payment_header_not_object"
PAYMENT_HEADER_REPEATED: Final = "payment_header_repeated"  # several payment headers: proxies may read another one
PAYMENT_ALREADY_SETTLED: Final = "payment_already_settled"
PAYMENT_IDENTIFIER_CONFLICT: Final = "payment_identifier_conflict"
PAYMENT_IDENTIFIER_REQUIRED: Final = "payment_identifier_required"
PAYMENT_IDENTIFIER_MISSING: Final = "payment_identifier_missing"
PAYMENT_IN_FLIGHT: Final = "payment_in_flight"
SETTLEMENT_PENDING: Final = "settlement_pending"
SETTLEMENT_UNKNOWN: Final = "settlement_unknown"
SETTLEMENT_UNAVAILABLE: Final = "settlement_unavailable"
FACILITATOR_UNAVAILABLE: Final = "facilitator_unavailable"
# -- safety ---------------------------------------------------------------------------------------
PAYER_DENIED: Final = "payer_denied"
BUDGET_EXCEEDED: Final = "budget_exceeded"
RATE_LIMITED: Final = "rate_limited"
TOOL_DISABLED: Final = "tool_disabled"
UPSTREAM_CIRCUIT_OPEN: Final = "upstream_circuit_open"
PRICE_GUARD: Final = "price_guard"
# -- the upstream ---------------------------------------------------------------------------------
UPSTREAM_TIMEOUT: Final = "upstream_timeout"
UPSTREAM_UNAVAILABLE: Final = "upstream_unavailable"
UPSTREAM_RESPONSE_TOO_LARGE: Final = "upstream_response_too_large"
UPSTREAM_REDIRECT: Final = "upstream_redirect"
UPSTREAM_FAULT: Final = "upstream_fault"
UPSTREAM_INVALID_RESPONSE: Final = "upstream_invalid_response"
UPSTREAM_ANSWER_LOST: Final = "upstream_answer_lost"
UPSTREAM_SCHEMA_DRIFT: Final = "upstream_schema_drift"
USAGE_UNREADABLE: Final = "usage_unreadable"  # an upto answer without a readable usage (catalog.usage)
UPSTREAM_STREAM_BROKEN: Final = "upstream_stream_broken"  # a relayed stream broke off (stage relay)
# -- our side -------------------------------------------------------------------------------------
LEDGER_UNAVAILABLE: Final = "ledger_unavailable"
STORE_UNAVAILABLE: Final = "store_unavailable"
STORE_BUSY: Final = "store_busy"
INTERNAL_ERROR: Final = "internal_error"
# -- the end user's OAuth 2.0 token (a tool's user_auth; gateway.upstream.user_auth) --------------
USER_TOKEN_MISSING: Final = "user_token_missing"
USER_TOKEN_INVALID: Final = "user_token_invalid"
USER_TOKEN_EXPIRED: Final = "user_token_expired"
USER_TOKEN_WRONG_ISSUER: Final = "user_token_wrong_issuer"
USER_TOKEN_WRONG_AUDIENCE: Final = "user_token_wrong_audience"
USER_SCOPE_MISSING: Final = "user_scope_missing"
USER_AUTH_UNAVAILABLE: Final = "user_auth_unavailable"
USER_TOKEN_EXCHANGE_FAILED: Final = "user_token_exchange_failed"
WALLET_NOT_LINKED: Final = "wallet_not_linked"
# -- re-access by sign-in-with-x (a tool's reaccess; gateway.pipeline.stages.reaccess): each a 402
# that still offers payment and a fresh sign-in challenge. The invalid_siwx_* ones are the x402
# SDK's codes for a sign-in that does not hold (validate_siwx_message and the signature).
REACCESS_NOT_PAID: Final = "reaccess_not_paid"  # no settled payment of this address for this resource
REACCESS_WINDOW_EXPIRED: Final = "reaccess_window_expired"  # there is one, older than the window
REACCESS_ANSWER_UNAVAILABLE: Final = "reaccess_answer_unavailable"  # paid, but no stored answer to serve
INVALID_SIWX_PAYLOAD: Final = "invalid_siwx_payload"  # the header is not a sign-in (base64 JSON of the fields)
INVALID_SIWX_SIGNATURE: Final = "invalid_siwx_signature"
INVALID_SIWX_CHAIN_ID: Final = "invalid_siwx_chain_id"  # not a chain the challenge offered
INVALID_SIWX_NONCE: Final = "invalid_siwx_nonce"  # already used: a sign-in is good once
INVALID_SIWX_DOMAIN_MISMATCH: Final = "invalid_siwx_domain_mismatch"
INVALID_SIWX_URI_MISMATCH: Final = "invalid_siwx_uri_mismatch"
INVALID_SIWX_ISSUED_AT: Final = "invalid_siwx_issued_at"
INVALID_SIWX_ISSUED_AT_TOO_OLD: Final = "invalid_siwx_issued_at_too_old"
INVALID_SIWX_ISSUED_AT_IN_FUTURE: Final = "invalid_siwx_issued_at_in_future"
INVALID_SIWX_EXPIRATION_TIME: Final = "invalid_siwx_expiration_time"
INVALID_SIWX_EXPIRED: Final = "invalid_siwx_expired"
INVALID_SIWX_NOT_BEFORE: Final = "invalid_siwx_not_before"
INVALID_SIWX_NOT_YET_VALID: Final = "invalid_siwx_not_yet_valid"
# -- signed receipts (GET /receipts/{paymentId}) --------------------------------------------------
RECEIPT_AUTH_INVALID: Final = "receipt_auth_invalid"
RECEIPT_AUTH_EXPIRED: Final = "receipt_auth_expired"
RECEIPT_AUTH_REPLAYED: Final = "receipt_auth_replayed"
RECEIPT_NOT_FOUND: Final = "receipt_not_found"
RECEIPT_NOT_SETTLED: Final = "receipt_not_settled"
RECEIPT_REFUNDED: Final = "receipt_refunded"  # its charge is owed back: no receipt attests it
RECEIPT_UNCONFIRMED: Final = "receipt_unconfirmed"  # neither the audit trail nor the chain bears the row out
RECEIPT_UNAVAILABLE: Final = "receipt_unavailable"  # only the chain could confirm it, and it does not answer
RECEIPTS_DISABLED: Final = "receipts_disabled"

# The request's URL (Host header, path, query) cannot name an offer's resource: malformed or too long.
INVALID_RESOURCE_URL: Final = "invalid_resource_url"

REFUSALS: Final[Mapping[str, Refusal]] = MappingProxyType({r.code: r for r in (
    Refusal(NOT_FOUND, 404, "discover"),
    Refusal(INVALID_RESOURCE_URL, 400, "fix_arguments"),
    Refusal(METHOD_NOT_ALLOWED, 405, "use_method"),
    Refusal(INVALID_ARGUMENTS, 422, "fix_arguments"),
    Refusal(INVALID_PARAMETER, 400, "fix_arguments"),
    Refusal(INVALID_JSON_BODY, 400, "fix_arguments"),
    Refusal(PRICE_ABOVE_MAX, 422, "fix_arguments"),
    Refusal(PRICE_OUT_OF_RANGE, 422, "fix_arguments"),
    Refusal(DUPLICATE_JSON_KEY, 400, "none"),
    Refusal(BODY_NOT_ALLOWED, 400, "none"),
    Refusal(REQUEST_TOO_LARGE, 413, "fix_arguments"),
    Refusal(REQUEST_BODY_TIMEOUT, 408, "retry"),
    Refusal(REQUEST_HEADERS_TOO_LARGE, 431, "fix_arguments"),
    Refusal(INVALID_RANGE, 422, "none"),
    Refusal(ADMIN_UNAUTHORIZED, 401, "none"),
    Refusal(SEARCH_QUERY_INVALID, 400, "fix_arguments"),
    Refusal(SEARCH_LIMIT_INVALID, 400, "fix_arguments"),
    Refusal(SEARCH_BUDGET_INVALID, 400, "fix_arguments"),
    Refusal(ANSWER_FIELDS_INVALID, 400, "fix_arguments"),
    Refusal(ANSWER_LIMIT_INVALID, 400, "fix_arguments"),
    Refusal(ANSWER_PARAMETER_INVALID, 400, "fix_arguments"),
    Refusal(ANSWER_TRIMMING_NOT_OFFERED, 400, "fix_arguments"),

    Refusal(PAYMENT_REQUIRED, 402, "pay"),
    Refusal(PAYMENT_REQUIREMENTS_MISMATCH, 402, "pay"),
    Refusal(PAYMENT_WINDOW_TOO_SHORT, 402, "pay"),
    Refusal(SETTLEMENT_FAILED, 402, "pay"),
    Refusal(INVALID_X402_VERSION, 400, "fix_payment"),
    Refusal(INVALID_PAYLOAD, 400, "fix_payment"),
    Refusal(INVALID_PAYMENT, 400, "none"),  # the codec's generic code: no prefix, so no fix_payment
    Refusal(INVALID_EXACT_EVM_PAYLOAD, 400, "fix_payment"),
    Refusal(INVALID_EXACT_EVM_PAYLOAD_SIGNATURE, 402, "pay"),  # checked offline, answered with the offer
    Refusal(RECIPIENT_MISMATCH, 402, "pay"),  # likewise: sign the offer's payTo
    Refusal(VALUE_MISMATCH, 402, "pay"),  # likewise: sign the offer's amount
    Refusal(INVALID_PERMIT2_SIGNATURE, 402, "pay"),  # likewise, for an upto payment
    Refusal(CHANNEL_ID_MISMATCH, 402, "pay"),  # likewise, for a batch-settlement voucher
    Refusal(VOUCHER_SIGNATURE_INVALID, 402, "pay"),
    Refusal(CHANNEL_REFUND_UNAVAILABLE, 402, "pay"),
    Refusal(INVALID_PAYMENT_IDENTIFIER, 400, "fix_payment"),
    Refusal(INVALID_PAYMENT_REQUIREMENTS, 400, "none"),  # the served facilitator's: a caller's bug
    Refusal(PAYMENT_HEADER_TOO_LARGE, 400, "fix_payment"),
    Refusal(PAYMENT_HEADER_NOT_BASE64, 400, "fix_payment"),
    Refusal(PAYMENT_HEADER_NOT_JSON, 400, "fix_payment"),
    Refusal(PAYMENT_HEADER_NOT_OBJECT, 400, "fix_payment"),
    Refusal(PAYMENT_HEADER_REPEATED, 400, "fix_payment"),
    Refusal(PAYMENT_ALREADY_SETTLED, 409, "new_payment"),
    Refusal(PAYMENT_IDENTIFIER_CONFLICT, 409, "new_payment"),
    # a resend of a payment first sent with a payment-identifier, without that id: no answer
    Refusal(PAYMENT_IDENTIFIER_REQUIRED, 409, "none"),
    # X402GW_PAYMENT_IDENTIFIER=required: a payment without one is refused before anything is spent
    Refusal(PAYMENT_IDENTIFIER_MISSING, 402, "pay"),
    Refusal(PAYMENT_IN_FLIGHT, 409, "retry", same_payment=True),
    Refusal(SETTLEMENT_PENDING, 503, "retry", same_payment=True),
    Refusal(SETTLEMENT_UNKNOWN, 503, "retry", same_payment=True),
    Refusal(SETTLEMENT_UNAVAILABLE, 503, "retry", same_payment=True),
    Refusal(FACILITATOR_UNAVAILABLE, 503, "retry", same_payment=True),

    Refusal(PAYER_DENIED, 403, "none"),
    Refusal(BUDGET_EXCEEDED, 403, "wait_until"),
    Refusal(RATE_LIMITED, 429, "retry"),
    Refusal(TOOL_DISABLED, 503, "another_tool"),
    Refusal(UPSTREAM_CIRCUIT_OPEN, 503, "another_tool"),
    Refusal(PRICE_GUARD, 503, "another_tool"),

    Refusal(UPSTREAM_TIMEOUT, 504, "retry", same_payment=True),
    Refusal(UPSTREAM_UNAVAILABLE, 502, "retry", same_payment=True),
    Refusal(UPSTREAM_RESPONSE_TOO_LARGE, 502, "none"),
    Refusal(UPSTREAM_REDIRECT, 502, "none"),
    Refusal(UPSTREAM_FAULT, 502, "none"),
    Refusal(UPSTREAM_INVALID_RESPONSE, 502, "none"),
    Refusal(UPSTREAM_ANSWER_LOST, 502, "none"),
    Refusal(UPSTREAM_SCHEMA_DRIFT, 502, "none"),
    Refusal(USAGE_UNREADABLE, 502, "none"),
    Refusal(UPSTREAM_STREAM_BROKEN, 502, "none"),

    Refusal(LEDGER_UNAVAILABLE, 503, "retry", same_payment=True),
    Refusal(STORE_UNAVAILABLE, 503, "retry", same_payment=True),
    Refusal(STORE_BUSY, 503, "retry"),
    Refusal(INTERNAL_ERROR, 500, "none"),

    Refusal(USER_TOKEN_MISSING, 401, "none"),
    Refusal(USER_TOKEN_INVALID, 401, "none"),
    Refusal(USER_TOKEN_EXPIRED, 401, "none"),
    Refusal(USER_TOKEN_WRONG_ISSUER, 401, "none"),
    Refusal(USER_TOKEN_WRONG_AUDIENCE, 401, "none"),
    Refusal(USER_SCOPE_MISSING, 403, "none"),
    Refusal(USER_AUTH_UNAVAILABLE, 503, "retry"),
    Refusal(USER_TOKEN_EXCHANGE_FAILED, 502, "none"),
    Refusal(WALLET_NOT_LINKED, 403, "none"),

    Refusal(RECEIPT_AUTH_INVALID, 401, "none"),
    Refusal(RECEIPT_AUTH_EXPIRED, 401, "none"),
    Refusal(RECEIPT_AUTH_REPLAYED, 401, "none"),
    Refusal(RECEIPT_NOT_FOUND, 404, "none"),
    Refusal(RECEIPT_NOT_SETTLED, 409, "none"),
    Refusal(RECEIPT_REFUNDED, 409, "none"),
    Refusal(RECEIPT_UNCONFIRMED, 409, "none"),
    Refusal(RECEIPT_UNAVAILABLE, 503, "retry"),
    Refusal(RECEIPTS_DISABLED, 404, "none"),

    Refusal(REACCESS_NOT_PAID, 402, "pay"),
    Refusal(REACCESS_WINDOW_EXPIRED, 402, "pay"),
    Refusal(REACCESS_ANSWER_UNAVAILABLE, 402, "pay"),
    Refusal(INVALID_SIWX_PAYLOAD, 402, "pay"),
    Refusal(INVALID_SIWX_SIGNATURE, 402, "pay"),
    Refusal(INVALID_SIWX_CHAIN_ID, 402, "pay"),
    Refusal(INVALID_SIWX_NONCE, 402, "pay"),
    Refusal(INVALID_SIWX_DOMAIN_MISMATCH, 402, "pay"),
    Refusal(INVALID_SIWX_URI_MISMATCH, 402, "pay"),
    Refusal(INVALID_SIWX_ISSUED_AT, 402, "pay"),
    Refusal(INVALID_SIWX_ISSUED_AT_TOO_OLD, 402, "pay"),
    Refusal(INVALID_SIWX_ISSUED_AT_IN_FUTURE, 402, "pay"),
    Refusal(INVALID_SIWX_EXPIRATION_TIME, 402, "pay"),
    Refusal(INVALID_SIWX_EXPIRED, 402, "pay"),
    Refusal(INVALID_SIWX_NOT_BEFORE, 402, "pay"),
    Refusal(INVALID_SIWX_NOT_YET_VALID, 402, "pay"),
)})

# Reasons the local facilitator gives for a payment it will not verify or could not settle. They
# reach the agent as the code of a fresh 402 (``PaymentChallenge``: next step ``pay``), like any
# reason a remote facilitator gives, so they are listed here but take no entry of their own.
SETTLEMENT_REASONS: Final[frozenset[str]] = frozenset({
    "invalid_payload",
    "payer_code_reverted",  # exact_guards.InFlight.struck: the payer's code made a settlement revert
    "unsupported_scheme",
    "network_mismatch",
    "missing_eip712_domain",
    "invalid_exact_evm_failed_to_get_network_config",
    "invalid_exact_evm_payload_signature",
    "invalid_exact_evm_payload_zero_amount",
    "invalid_exact_evm_payload_recipient_mismatch",
    "invalid_exact_evm_payload_authorization_valid_after",
    "invalid_exact_evm_payload_authorization_valid_before",
    "invalid_exact_evm_insufficient_balance",
    "invalid_exact_evm_nonce_already_used",
    "invalid_exact_evm_transfer_event_mismatch",
    # upto (settlement.schemes.upto): the Permit2 authorization's checks, as the x402 SDK names them
    "invalid_permit2_spender",
    "invalid_permit2_recipient_mismatch",
    "permit2_token_mismatch",
    "permit2_amount_mismatch",
    "permit2_deadline_expired",
    "permit2_not_yet_valid",
    "permit2_nonce_used",
    "permit2_allowance_required",
    "permit2_insufficient_balance",
    "upto_facilitator_mismatch",
    "upto_unauthorized_facilitator",
    "upto_settlement_would_revert",
    "upto_settlement_reverted",
    "invalid_upto_evm_scheme",
    "invalid_upto_evm_network_mismatch",
    "invalid_upto_evm_payload_settlement_exceeds_amount",
    # exact through Permit2 (settlement.schemes.exact_permit2): the checks above, and these
    "invalid_permit2_amount",
    "permit2_transfer_failed",
    "permit2_settlement_would_revert",
    "permit2_settlement_reverted",
    # batch-settlement (settlement.schemes.channels): the x402 SDK's reasons, and three of ours
    *(f"invalid_batch_settlement_evm_{r}" for r in (
        "scheme", "network_mismatch", "payload_type", "channel_not_found", "receiver_mismatch", "token_mismatch",
        "receiver_authorizer_mismatch", "withdraw_delay_mismatch", "receive_authorization_signature",
        "payload_authorization_valid_before", "deposit_simulation_failed", "deposit_transaction_failed",
        "cumulative_amount_mismatch", "cumulative_exceeds_balance", "channel_busy",
        "channel_withdrawing", "channel_closed", "cumulative_not_increasing", "refund_no_balance",
        "refund_transaction_failed", "deposit_below_min_deposit", "payer_has_code", "refund_too_early",
    )),
})


def refusal(code: str) -> Refusal | None:
    """The table's entry for ``code``; None for a code the table does not know (see above)."""
    return REFUSALS.get(code)
