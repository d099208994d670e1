"""docker-compose's one-shot set-up job: the test USDC on the compose anvil, and a catalog for it.

Deploys the token (once: a deployment whose token still has code on this chain is kept), writes
the deployment file the gateway reads (RPC URL and settlement key for chain 31337), and writes the
demo catalog with its upstream pointed at the compose service instead of 127.0.0.1.

Environment: ANVIL_RPC_URL, REST_UPSTREAM_URL, X402GW_DEPLOYMENT_FILE, X402GW_CATALOG (output).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from web3 import Web3

from gateway.settings import DEFAULT_CATALOG
from gateway.devkit.devchain import DEFAULT_TOKEN_ADDRESS, Deployment, setup_devchain

DEMO_UPSTREAM = "http://127.0.0.1:9101"


def deployed(path: Path, rpc_url: str) -> Deployment | None:
    if not path.exists():
        return None
    deployment = Deployment.read(path)
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 10}))
    if deployment.rpc_url != rpc_url or not w3.eth.get_code(Web3.to_checksum_address(deployment.token.address)):
        return None  # a new chain (anvil keeps nothing across restarts): deploy again
    return deployment


def main() -> int:
    rpc_url = os.environ["ANVIL_RPC_URL"]
    deployment_file = Path(os.environ["X402GW_DEPLOYMENT_FILE"])
    catalog_file = Path(os.environ["X402GW_CATALOG"])
    deployment = deployed(deployment_file, rpc_url)
    if deployment is None:
        deployment = setup_devchain(rpc_url)
        deployment_file.parent.mkdir(parents=True, exist_ok=True)
        deployment.write(deployment_file)
    text = DEFAULT_CATALOG.read_text(encoding="utf-8")
    text = text.replace(DEMO_UPSTREAM, os.environ["REST_UPSTREAM_URL"].rstrip("/"))
    text = text.replace(DEFAULT_TOKEN_ADDRESS, deployment.token.address)
    catalog_file.parent.mkdir(parents=True, exist_ok=True)
    catalog_file.write_text(text, encoding="utf-8")
    print(f"token {deployment.token.address} on {rpc_url}; catalog {catalog_file}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
