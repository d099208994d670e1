"""``x402gw serve --workers N`` refuses a configuration its workers could not share: one line with
a stable code, exit 2, before any worker starts (issue 20 item 2). The running workers are tested
end to end in tests/e2e/test_workers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.cli.workers import WorkerPlanError, plan_workers, read_keys
from gateway.settings import Settings
from tests.gateway.cli.test_serve_settings import LIVE, refused

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/x402gw"
REDIS = "redis://127.0.0.1:6379/0"
KEYS = ["0x" + f"{i:02x}" * 32 for i in (0x11, 0x22, 0x33)]


def shared(**extra: object) -> Settings:
    return Settings(database_url=PG, redis_url=REDIS, **extra)  # type: ignore[arg-type]


def code_of(settings: Settings, workers: int, keys: list[str], settles_locally: bool = True) -> str:
    with pytest.raises(WorkerPlanError) as caught:
        plan_workers(settings, workers, keys, settles_locally)
    return caught.value.code


def test_two_workers_with_the_in_memory_store_is_refused_at_start_up(tmp_path: Path) -> None:
    output = refused(tmp_path, "workers_need_redis", X402GW_WORKERS="2", **LIVE)
    assert "X402GW_REDIS_URL" in output


def test_what_workers_cannot_share_is_refused_with_its_code() -> None:
    assert code_of(Settings(database_url=PG), 2, KEYS) == "workers_need_redis"
    assert code_of(Settings(redis_url=REDIS), 2, KEYS) == "workers_need_postgresql"  # the SQLite default
    assert code_of(shared(), 3, KEYS[:2]) == "workers_need_settlement_keys"
    assert code_of(shared(batch_settlement={"eip155:31337": {"max_wait_ms": 20, "max_payments": 5}}), 2, KEYS) == \
        "workers_need_batch_settlers"
    assert code_of(shared(refund_key=KEYS[2]), 2, KEYS) == "workers_refund_key_shared"
    assert code_of(shared(), 0, KEYS) == "workers_invalid"


def test_batch_settlement_with_several_workers_is_refused() -> None:
    with pytest.raises(WorkerPlanError) as caught:
        plan_workers(shared(), 2, KEYS, True, frozenset({"exact", "batch-settlement"}))
    assert caught.value.code == "workers_channels_unsupported"
    assert len(plan_workers(shared(), 1, [], True, frozenset({"batch-settlement"}))) == 1  # one process: its own


def test_batched_settlement_needs_a_batch_settler_per_worker() -> None:
    """Each worker settles from its own account, and a BatchSettler takes one: one contract each
    (which is whose is read on chain by each worker at start, ``test_batch_settlers``)."""
    contracts = ["0x" + f"{n:02x}" * 20 for n in (1, 2, 3)]

    def batched(*listed: str, contract: str | None = None) -> Settings:
        policy: dict[str, object] = {"contract": contract} if contract else {"contracts": list(listed)}
        return shared(batch_settlement={"eip155:31337": policy, "eip155:84532": {"contracts": contracts}})

    assert code_of(batched(contract=contracts[0]), 2, KEYS) == "workers_need_batch_settlers"
    assert code_of(batched(*contracts[:1]), 2, KEYS) == "workers_need_batch_settlers"
    assert code_of(batched(*contracts[:2]), 3, KEYS) == "workers_need_batch_settlers"
    assert len(plan_workers(batched(*contracts[:2]), 2, KEYS, True)) == 2
    assert len(plan_workers(batched(contract=contracts[0]), 1, [], True)) == 1  # one process: the one contract


def test_batch_settlement_names_its_contracts_one_way() -> None:
    one, two = "0x" + "01" * 20, "0x" + "02" * 20
    for policy in ({"contract": one, "contracts": [two]}, {"contracts": [one, one.upper().replace("0X", "0x")]},
                   {"contracts": []}, {"contracts": ["0x12"]}):
        with pytest.raises(ValidationError):
            Settings(batch_settlement={"eip155:31337": policy})
    assert Settings(batch_settlement={"eip155:31337": {"contracts": [one, two]}}).batch_settlement[
        "eip155:31337"].candidates == [one, two]
    assert Settings(batch_settlement={"eip155:31337": {"contract": one}}).batch_settlement["eip155:31337"].candidates == [one]
    assert Settings(batch_settlement={"eip155:31337": {}}).batch_settlement["eip155:31337"].candidates == []


def test_each_worker_gets_its_index_and_its_own_key() -> None:
    assert plan_workers(shared(), 2, KEYS, True) == [
        {"X402GW_WORKER_INDEX": "0", "X402GW_SETTLEMENT_KEY": KEYS[0]},
        {"X402GW_WORKER_INDEX": "1", "X402GW_SETTLEMENT_KEY": KEYS[1]},
    ]
    # settled by a remote facilitator: no account of ours, no keys needed
    assert plan_workers(shared(), 2, [], False) == [{"X402GW_WORKER_INDEX": "0"}, {"X402GW_WORKER_INDEX": "1"}]


def test_the_keys_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"# worker keys\n{KEYS[0]}\n\n{KEYS[1]}\n")
    assert read_keys(path) == KEYS[:2]
    path.write_text(f"{KEYS[0]}\n{KEYS[0]}\n")
    with pytest.raises(WorkerPlanError, match="listed twice"):
        read_keys(path)
    path.write_text("0x1234\n")
    with pytest.raises(WorkerPlanError) as caught:
        read_keys(path)
    assert caught.value.code == "invalid_setting" and "0x1234" not in caught.value.message
    with pytest.raises(WorkerPlanError) as missing:
        read_keys(tmp_path / "absent.txt")
    assert missing.value.code == "secret_file_unreadable"
