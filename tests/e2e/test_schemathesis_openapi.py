"""Property-based API test: schemathesis generates requests from the gateway's own /openapi.json
(valid and invalid ones) and sends them, unpaid, to a real gateway. No answer may be a 5xx, and no
priced operation may answer 2xx without a payment. Bounded: a few examples per operation."""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.conftest import RunningGateway

EXAMPLES_PER_OPERATION = 25


def test_generated_requests_never_get_a_5xx_or_unpaid_content(gateway: RunningGateway, upstream: str) -> None:
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(gateway.catalogs.tools)
    priced = {
        op.path + " " + op.method.upper(): op.definition.raw["x-x402-price"]["atomic"] for op in operations
    }
    assert all(int(atomic) > 0 for atomic in priced.values())
    seen: dict[int, int] = {}

    for operation in operations:
        strategy = st.one_of(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )

        @given(case=strategy)
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            response = case.call(base_url=gateway.url, timeout=30)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            case.validate_response(response, checks=[not_a_server_error])
            assert not 200 <= response.status_code < 300, (
                f"unpaid {response.status_code} from priced {case.method} {case.formatted_path}"
            )
            if response.status_code == 402:
                assert "payment-required" in {name.lower() for name in response.headers}

        run()

    assert seen.get(402, 0) > 0, seen  # valid unpaid calls were priced, not refused
    assert httpx.get(f"{upstream}/stats").json()["total"] == 0  # nothing unpaid reached the upstream
    print("statuses seen:", seen)
    assert gateway.ledger.all() == []

