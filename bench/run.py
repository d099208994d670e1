"""The benchmark harness: seven cases side by side on loopback, one command.

    python -m bench.run [--duration 5] [--cases ABCDEFG] [--configs embedded,replica] [--workers 1,2]

A  the sample upstream (gateway/devkit/samples/rest_upstream.py) called directly
B  bench/passthrough_proxy.py: Starlette + one shared aiohttp session, the floor of a Python proxy
C  x402gw, unpaid request → 402
D  x402gw, paid, local facilitator: one settlement transaction per call on anvil
E  the official x402 SDK's payment middleware + in-process SDK facilitator (bench/sdk_server.py)
F  x402gw, paid, batched settlement (X402GW_BATCH_SETTLEMENT, BatchSettler)
G  the chain's own limit: the same kind of pre-signed transferWithAuthorization transactions sent
   straight to anvil (eth_sendRawTransaction + receipt), bench/chain_limit.py

Every server is its own process (uvicorn, uvloop + httptools, one worker, no access log); the
upstream is shared. Load: wrk (one thread, bench/wrk_report.lua) at concurrency 1 and 32 for
``--duration`` seconds each after a one-second warm-up; paid requests each carry a fresh
authorization pre-signed by the harness (anvil accounts 1-8 take turns). G's load generator is a
Python asyncio client in its own process pinned to one CPU with taskset. Each paid case (D, E, F,
G) gets a fresh anvil with automine. Gas per payment with and without batching is measured on a
fresh anvil at the end. Exits 1 when a target ratio (at concurrency 32) is missed.

The gateway cases (C, D, F) run in each deployment asked for (bench/setups.py): ``--configs
embedded`` (the default: in-memory store + SQLite ledger, the plain cases the ratios use),
``replica`` (Redis store + PostgreSQL ledger, as production runs), and ``--workers 2``
(``x402gw serve --workers 2``, replica, each worker settling from its own funded account; in F
through a BatchSettler of its own). Those runs are labelled, e.g. ``D [redis+pg, 2 workers]``, and tabled at the end
next to the embedded single process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coincurve import PrivateKey
from eth_abi import encode as abi_encode
from eth_account import Account

from bench.setups import Deployed, Setup, deployed
from gateway.devkit.devchain import ANVIL_ADDRESSES, ANVIL_KEYS, LOCAL_NETWORK, Deployment, find_anvil, setup_devchain
from settlement.schemes.eip712 import TransferAuthorization, authorization_digest, domain_separator, split_signature

REPO = Path(__file__).resolve().parent.parent
PAY_TO = ANVIL_ADDRESSES[9]
PAYER_KEYS = ANVIL_KEYS[1:9]
CONCURRENCIES = (1, 32)
# The bars of issue 20 (issue 9's were D/E 3, D/G 0.8, F/B 0.5; F/B's goal beyond 0.3 is still 0.5).
TARGETS = {"C/B": 1.5, "D/E": 10.0, "D/G": 1.0, "F/B": 0.3}
GATEWAY_PATH = "/quotes/AAPL"
UPSTREAM_PATH = "/api/v1/quote/AAPL"
BATCH_POLICY = {"max_wait_ms": 20, "max_payments": 50, "flush_when_idle": True}
SEL_TWA = bytes.fromhex("e3ee160e")
EMBEDDED = Setup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is up
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def process(cmd: Sequence[str], *, env: dict[str, str] | None = None, ready: str | None = None,
            log: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        list(cmd), env={**os.environ, **(env or {})}, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        if ready:
            wait_http(ready, process=proc)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


def uvicorn_cmd(target: str, port: int, *, factory: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
           "--http", "httptools", "--no-access-log", "--log-level", "warning", "--workers", "1"]
    return cmd + (["--factory"] if factory else [])


@contextmanager
def anvil(workdir: Path) -> Iterator[Deployment]:
    """A fresh anvil (automine, --quiet: no per-transaction log) with the token and BatchSettler."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [find_anvil(), "--host", "127.0.0.1", "--port", str(port), "--chain-id", "31337", "--quiet"]
    with process(cmd):
        deadline = time.monotonic() + 15
        while True:
            try:
                rpc(url, "eth_chainId", [])
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        deployment = setup_devchain(url)
        yield deployment


def rpc(url: str, method: str, params: list[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error']}")
    return answer["result"]


# ----------------------------------------------------------------------------------- signing


@dataclass
class Signer:
    key: PrivateKey
    address: str


SIGNERS = [Signer(PrivateKey(bytes.fromhex(k[2:])), Account.from_key(k).address) for k in PAYER_KEYS]


def sign_authorizations(accepted: dict[str, Any], count: int, offset: int = 0) -> list[tuple[TransferAuthorization, bytes]]:
    extra = accepted["extra"]
    chain_id = int(accepted["network"].split(":")[1])
    domain = domain_separator(extra["name"], extra["version"], chain_id, accepted["asset"])
    valid_before = int(time.time()) + int(accepted["maxTimeoutSeconds"])
    out = []
    for i in range(count):
        signer = SIGNERS[(i + offset) % len(SIGNERS)]
        auth = TransferAuthorization(signer.address, accepted["payTo"], int(accepted["amount"]), 0, valid_before, os.urandom(32))
        sig = signer.key.sign_recoverable(authorization_digest(domain, auth), hasher=None)
        out.append((auth, sig[:64] + bytes([sig[64] + 27])))
    return out


def payment_headers(offer: dict[str, Any], count: int) -> list[str]:
    """PAYMENT-SIGNATURE values (x402 v2) for the first requirement of a decoded 402 offer."""
    accepted = offer["accepts"][0]
    headers = []
    for auth, sig in sign_authorizations(accepted, count):
        payload = {
            "x402Version": 2,
            "resource": offer.get("resource"),
            "accepted": accepted,
            "payload": {
                "signature": "0x" + sig.hex(),
                "authorization": {
                    "from": auth.from_, "to": auth.to, "value": str(auth.value), "validAfter": str(auth.valid_after),
                    "validBefore": str(auth.valid_before), "nonce": "0x" + auth.nonce.hex(),
                },
            },
        }
        if payload["resource"] is None:
            del payload["resource"]
        headers.append(base64.b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode())
    return headers


def fetch_offer(url: str) -> dict[str, Any]:
    try:
        urllib.request.urlopen(url, timeout=10)
    except urllib.error.HTTPError as exc:
        if exc.code == 402:
            return dict(json.loads(base64.b64decode(exc.headers["payment-required"])))
        raise
    raise RuntimeError(f"{url} did not answer 402")


def raw_settlement_txs(deployment: Deployment, count: int) -> list[str]:
    """Signed transferWithAuthorization transactions from the settlement account, nonces in order."""
    accepted = {"network": LOCAL_NETWORK, "asset": deployment.token.address, "payTo": PAY_TO, "amount": "2000",
                "maxTimeoutSeconds": 600, "extra": {"name": deployment.token.name, "version": deployment.token.version}}
    account = Account.from_key(deployment.settlement_key)
    nonce = int(rpc(deployment.rpc_url, "eth_getTransactionCount", [account.address, "pending"]), 16)
    base_fee = int(rpc(deployment.rpc_url, "eth_getBlockByNumber", ["latest", False])["baseFeePerGas"], 16)
    txs = []
    for i, (auth, sig) in enumerate(sign_authorizations(accepted, count)):
        v, r, s = split_signature(sig)
        data = SEL_TWA + abi_encode(
            ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"],
            [auth.from_, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce, v, r, s],
        )
        tx = {"type": 2, "chainId": 31337, "nonce": nonce + i, "to": deployment.token.address, "value": 0, "data": data,
              "gas": 150_000, "maxFeePerGas": 2 * base_fee + 1_000_000, "maxPriorityFeePerGas": 1_000_000}
        txs.append("0x" + account.sign_transaction(tx).raw_transaction.hex())
    return txs


# ------------------------------------------------------------------------------------- load


@dataclass
class Result:
    case: str
    concurrency: int
    requests: int
    ok: int
    seconds: float
    p50_ms: float
    p99_ms: float
    note: str = ""

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def require_wrk() -> None:
    """Every benchmark that drives load checks this first, before it starts a chain: not a traceback."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")


def wrk(url: str, path: str, expected: int, concurrency: int, duration: float, headers_file: Path | None = None) -> dict[str, Any]:
    require_wrk()
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "30s", "--latency",
           "-s", str(REPO / "bench" / "wrk_report.lua"), url, "--", path, str(expected),
           str(headers_file) if headers_file else "", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("WRKJSON "))
    return dict(json.loads(line[len("WRKJSON "):]))


def to_result(case: str, concurrency: int, raw: dict[str, Any]) -> Result:
    note = []
    if raw.get("bad"):
        note.append(f"{raw['bad']} unexpected answers (last status {raw.get('bad_status')})")
    if raw.get("exhausted"):
        note.append(f"{raw['exhausted']} requests after the pre-signed payments ran out")
    if raw.get("socket_errors"):
        note.append(f"{raw['socket_errors']} socket errors")
    return Result(case, concurrency, raw["requests"], raw["ok"], raw["duration_us"] / 1e6,
                  raw["p50_us"] / 1000, raw["p99_us"] / 1000, "; ".join(note))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def run_http_case(case: str, url: str, path: str, expected: int, duration: float, workdir: Path,
                  offer_url: str | None = None, paid_rate: float = 0) -> list[Result]:
    results = []
    offer = fetch_offer(offer_url) if offer_url else None
    warm = None
    if offer is not None:
        warm = write_lines(workdir / f"{case}-warm.txt", payment_headers(offer, int(paid_rate * 1.2) + 50))
    wrk(url, path, expected, 4, 1, warm)  # warm-up: connections, caches, JIT-less but lazy imports
    for concurrency in CONCURRENCIES:
        headers_file = None
        if offer is not None:
            count = int(paid_rate * duration * (1 if concurrency == 1 else 2.5)) + 200
            headers_file = write_lines(workdir / f"{case}-c{concurrency}.txt", payment_headers(offer, count))
        results.append(to_result(case, concurrency, wrk(url, path, expected, concurrency, duration, headers_file)))
        print(format_result(results[-1]), flush=True)
    return results


def format_result(r: Result) -> str:
    line = f"{r.case}  c={r.concurrency:<3} {r.rps:9.1f} req/s   p50 {r.p50_ms:8.2f} ms   p99 {r.p99_ms:8.2f} ms   ({r.ok} ok in {r.seconds:.1f} s)"
    return line + (f"   [{r.note}]" if r.note else "")


@contextmanager
def gateway(workdir: Path, deployment: Deployment, upstream: str, name: str, extra_env: dict[str, str] | None = None,
            setup: Setup = EMBEDDED) -> Iterator[str]:
    """A gateway process serving the demo catalog against ``upstream``, deployed as ``setup``."""
    with gateway_deployed(workdir, deployment, upstream, name, extra_env, setup) as (url, _):
        yield url


@contextmanager
def gateway_deployed(workdir: Path, deployment: Deployment, upstream: str, name: str,
                     extra_env: dict[str, str] | None = None, setup: Setup = EMBEDDED,
                     launcher: Sequence[str] = ()) -> Iterator[tuple[str, Deployed]]:
    """``gateway``, and where it keeps its state (its ledger's URL). ``launcher``: a command the
    gateway's is appended to (a profiler that starts it as its child, e.g. ``py-spy record --``)."""
    catalog = (REPO / "catalog" / "examples" / "demo.yaml").read_text().replace("http://127.0.0.1:9101", upstream)
    catalog_path = workdir / f"{name}-catalog.yaml"
    catalog_path.write_text(catalog)
    deployment_path = workdir / f"{name}-devchain.json"
    deployment.write(deployment_path)
    port = free_port()
    batch = json.loads(extra_env["X402GW_BATCH_SETTLEMENT"]) if extra_env and "X402GW_BATCH_SETTLEMENT" in extra_env else None
    with deployed(setup, workdir, name, deployment.rpc_url, batch) as where:
        env = {
            "X402GW_CATALOG": str(catalog_path), "X402GW_PORT": str(port), "X402GW_DEPLOYMENT_FILE": str(deployment_path),
            "X402GW_LOG_LEVEL": "WARNING", **(extra_env or {}), **where.env,
        }
        url = f"http://127.0.0.1:{port}"
        cmd = [*launcher, sys.executable, "-m", "gateway.cli.main", "serve", *where.args]
        with process(cmd, env=env, ready=f"{url}/healthz",
                     log=workdir / f"{name}.log") as proc:
            where.pid = proc.pid
            yield url, where


def run_chain_limit(deployment: Deployment, workdir: Path, duration: float, rate: float) -> list[Result]:
    results = []
    pin = ["taskset", "-c", "1"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
    for concurrency in CONCURRENCIES:
        txs = raw_settlement_txs(deployment, int(rate * duration * (1 if concurrency == 1 else 2.5)) + 200)
        tx_file = write_lines(workdir / f"G-c{concurrency}.txt", txs)
        out = subprocess.run(
            pin + [sys.executable, "-m", "bench.chain_limit", "--rpc", deployment.rpc_url, "--txs", str(tx_file),
                   "--concurrency", str(concurrency), "--duration", str(duration)],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout
        raw = json.loads(next(l for l in out.splitlines() if l.startswith("RESULTJSON "))[len("RESULTJSON "):])
        results.append(to_result("G", concurrency, raw))
        print(format_result(results[-1]), flush=True)
        # What is left in the file was signed with later nonces: never sent. Nonces are consecutive,
        # so the next round re-reads the account's nonce.
    return results


# ---------------------------------------------------------------------------------------- gas


def measure_gas(workdir: Path) -> list[str]:
    """Gas per payment: one transferWithAuthorization per transaction vs BatchSettler batches."""
    from settlement.chain.client import JsonRpcChain
    from settlement.schemes.batch import BatchingFacilitator, BatchPolicy
    from settlement.schemes.exact_local import LocalFacilitator
    from settlement.x402.wire import PaymentRequirements

    lines = []
    with anvil(workdir) as deployment:
        req = PaymentRequirements(
            scheme="exact", network=LOCAL_NETWORK, amount="2000", asset=deployment.token.address, pay_to=PAY_TO,
            max_timeout_seconds=120, extra={"name": deployment.token.name, "version": deployment.token.version},
        )
        offer = {"accepts": [req.to_wire()]}

        def payloads(n: int) -> list[Any]:
            from settlement.x402.codec import decode_header_json
            from settlement.x402.wire import PaymentPayload

            return [PaymentPayload.model_validate(decode_header_json(h)) for h in payment_headers(offer, n)]

        async def go() -> None:
            chain = JsonRpcChain(deployment.rpc_url, 31337, deployment.settlement_key)
            local = LocalFacilitator({LOCAL_NETWORK: chain})
            try:
                singles = [await local.settle(p, req) for p in payloads(20)]
                gas = [int(rpc(deployment.rpc_url, "eth_getTransactionReceipt", [s.transaction])["gasUsed"], 16)
                       for s in singles]
                lines.append(f"  one transferWithAuthorization per tx: {sorted(gas)[len(gas) // 2]} gas per payment "
                             f"(median of {len(gas)}; payTo already holds tokens)")
                for size in (1, 10, 50, 100):
                    batching = BatchingFacilitator(
                        local, {LOCAL_NETWORK: chain}, {LOCAL_NETWORK: str(deployment.batch_settler)},
                        {LOCAL_NETWORK: BatchPolicy(10_000, size)},
                    )
                    results = await asyncio.gather(*(batching.settle(p, req) for p in payloads(size)))
                    assert all(r.success for r in results), results
                    used = int(rpc(deployment.rpc_url, "eth_getTransactionReceipt", [results[0].transaction])["gasUsed"], 16)
                    lines.append(f"  batch of {size:3}: {used:8} gas per tx, {used / size:8.0f} gas per payment")
            finally:
                await chain.close()

        asyncio.run(go())
    return lines


# ------------------------------------------------------------------------------ gateway cases


def setups(configs: str, workers: str) -> list[Setup]:
    """Each deployment to run C, D and F in; more than one worker is always the replica one."""
    out: list[Setup] = []
    for config in (c.strip() for c in configs.split(",") if c.strip()):
        if config not in ("embedded", "replica"):
            raise SystemExit(f"--configs: unknown deployment {config!r} (embedded, replica)")
        for count in (int(n) for n in workers.split(",") if n.strip()):
            setup = Setup("replica" if count > 1 else config, count)
            if setup not in out:
                out.append(setup)
    return sorted(out, key=lambda s: (s.config != "embedded", s.workers))


def run_gateway_cases(cases: set[str], setup: Setup, workdir: Path, upstream: str, duration: float) -> list[Result]:
    """C, D and F (those asked for) with the gateway deployed as ``setup``; their labels carry it."""
    results: list[Result] = []
    slug = f"{setup.config}-{setup.workers}"
    if "C" in cases:
        with anvil(workdir) as deployment, gateway(workdir, deployment, upstream, f"C-{slug}", setup=setup) as url:
            results += run_http_case("C" + setup.label, url, GATEWAY_PATH, 402, duration, workdir)
    if "D" in cases:
        with anvil(workdir) as deployment, gateway(workdir, deployment, upstream, f"D-{slug}", setup=setup) as url:
            results += run_http_case("D" + setup.label, url, GATEWAY_PATH, 200, duration, workdir, url + GATEWAY_PATH, 800)
    if "F" in cases:
        env = {"X402GW_BATCH_SETTLEMENT": json.dumps({LOCAL_NETWORK: BATCH_POLICY})}
        with anvil(workdir) as deployment, gateway(workdir, deployment, upstream, f"F-{slug}", env, setup=setup) as url:
            results += run_http_case("F" + setup.label, url, GATEWAY_PATH, 200, duration, workdir, url + GATEWAY_PATH, 1500)
    return results


def print_deployments(results: dict[tuple[str, int], Result]) -> None:
    """D and F in every deployment run, next to the embedded single process."""
    labelled = sorted({case for case, _ in results if case[0] in "CDF" and len(case) > 1})
    if not labelled:
        return
    print()
    print("deployments (successful answers/s; x: relative to the embedded single process):")
    for case in sorted({case[0] for case in labelled}):
        for name in [case] + [c for c in labelled if c[0] == case]:
            parts = []
            for concurrency in CONCURRENCIES:
                r, base = results.get((name, concurrency)), results.get((case, concurrency))
                if r is None:
                    continue
                rel = f" (x{r.rps / base.rps:.2f})" if base is not None and base.rps and name != case else ""
                parts.append(f"c={concurrency}: {r.rps:8.1f}{rel}")
            print(f"  {name:<30} {'   '.join(parts)}")


# ---------------------------------------------------------------------------------------- main


def ratio(results: dict[tuple[str, int], Result], a: str, b: str, concurrency: int) -> float | None:
    ra, rb = results.get((a, concurrency)), results.get((b, concurrency))
    if ra is None or rb is None or rb.rps == 0:
        return None
    return ra.rps / rb.rps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per case and concurrency")
    parser.add_argument("--cases", default="ABCDEFG")
    parser.add_argument("--no-gas", action="store_true", help="skip the gas-per-payment measurement")
    parser.add_argument("--configs", default="embedded",
                        help="deployments of the gateway cases C, D, F: embedded (memory + SQLite), replica "
                             "(Redis + PostgreSQL), comma-separated, e.g. embedded,replica")
    parser.add_argument("--workers", default="1",
                        help="x402gw serve --workers, comma-separated, e.g. 1,2 (more than 1: replica; F deploys a "
                             "BatchSettler per worker's account)")
    args = parser.parse_args(argv)
    require_wrk()
    cases = set(args.cases.upper())
    duration = args.duration
    results: dict[tuple[str, int], Result] = {}
    print(f"x402gw benchmark: {os.cpu_count()} CPUs, {duration:g} s per case and concurrency, wrk -t1, "
          f"concurrency {' and '.join(map(str, CONCURRENCIES))}, batch policy {json.dumps(BATCH_POLICY)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="x402gw-bench-") as tmp:
        workdir = Path(tmp)
        upstream_port = free_port()
        upstream = f"http://127.0.0.1:{upstream_port}"
        with process(uvicorn_cmd("gateway.devkit.samples.rest_upstream:create_app", upstream_port, factory=True),
                     ready=f"{upstream}/stats"):

            def record(rs: list[Result]) -> None:
                for r in rs:
                    results[(r.case, r.concurrency)] = r

            if "A" in cases:
                record(run_http_case("A", upstream, UPSTREAM_PATH, 200, duration, workdir))
            if "B" in cases:
                port = free_port()
                with process(uvicorn_cmd("bench.passthrough_proxy:app", port), env={"BENCH_UPSTREAM": upstream},
                             ready=f"http://127.0.0.1:{port}{UPSTREAM_PATH}"):
                    record(run_http_case("B", f"http://127.0.0.1:{port}", UPSTREAM_PATH, 200, duration, workdir))
            if "E" in cases:
                with anvil(workdir) as deployment:
                    port = free_port()
                    env = {"BENCH_UPSTREAM": upstream, "BENCH_RPC_URL": deployment.rpc_url,
                           "BENCH_TOKEN": deployment.token.address, "BENCH_PAY_TO": PAY_TO,
                           "BENCH_SETTLEMENT_KEY": deployment.settlement_key}
                    url = f"http://127.0.0.1:{port}"
                    with process(uvicorn_cmd("bench.sdk_server:app", port), env=env, ready=f"{url}/healthz",
                                 log=workdir / "E.log"):
                        record(run_http_case("E", url, UPSTREAM_PATH, 200, duration, workdir, url + UPSTREAM_PATH, 150))
            for setup in setups(args.configs, args.workers):
                record(run_gateway_cases(cases, setup, workdir, upstream, duration))
            if "G" in cases:
                with anvil(workdir) as deployment:
                    record(run_chain_limit(deployment, workdir, duration, 1500))
        gas_lines = [] if args.no_gas else measure_gas(workdir)

    print()
    print("ratios (throughput of successful answers; targets apply at concurrency 32):")
    missed = []
    for name, target in TARGETS.items():
        a, b = name.split("/")
        parts = []
        for concurrency in CONCURRENCIES:
            value = ratio(results, a, b, concurrency)
            parts.append(f"c={concurrency}: {'n/a' if value is None else f'{value:6.2f}'}")
        value = ratio(results, a, b, CONCURRENCIES[-1])
        verdict = "not run" if value is None else ("met" if value >= target else "MISSED")
        if value is not None and value < target:
            missed.append(name)
        print(f"  {name}  {'   '.join(parts)}   target >= {target:g} at c=32: {verdict}")
    print_deployments(results)
    if gas_lines:
        print()
        print("gas per payment (fresh anvil):")
        for line in gas_lines:
            print(line)
    if missed:
        print(f"\nmissed targets: {', '.join(missed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
