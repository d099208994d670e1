// Pays one x402 call with the official TypeScript client (@x402/fetch + @x402/evm, protocol v2) and
// prints a JSON summary on stdout: the HTTP status, the body, the requirements the library chose,
// the PAYMENT-SIGNATURE header it sent and the PAYMENT-RESPONSE header decoded.
//
//   X402_PAYER_KEY=0x... node tests/support/ts_client/pay.mjs URL
//       [--network eip155:31338] [--asset 0x...]      which offer to pay (a policy: only that one)
//       [--allow eip155:31337/0x... ...]              spend controls: these tokens allowed, uncapped
//       [--no-spend-controls]                         spend controls off (any asset, no cap)
//       [--networks eip155:31337,eip155:31338]        networks the EVM scheme is registered for
//
// Without --network/--asset the library's own choice stands (its default selector). Without
// --allow or --no-spend-controls the library's default spend controls apply: only the tokens it
// knows (mainnet/testnet USDC and the like), so a local chain's test token is refused.
// The EVM scheme derives the chain id from the CAIP-2 network (eip155:<id>), so a local chain
// needs no viem chain definition, only a registration that matches it (default "eip155:*").

import { parseArgs } from "node:util";

import { ExactEvmScheme } from "@x402/evm";
import { UptoEvmScheme } from "@x402/evm/upto/client";
import { decodePaymentResponseHeader, wrapFetchWithPayment, x402Client } from "@x402/fetch";
import { privateKeyToAccount } from "viem/accounts";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    network: { type: "string" },
    asset: { type: "string" },
    allow: { type: "string", multiple: true },
    "no-spend-controls": { type: "boolean", default: false },
    networks: { type: "string", default: "eip155:*" },
  },
});

const [url] = positionals;
const key = process.env.X402_PAYER_KEY;
if (!url || !key) {
  process.stderr.write("usage: X402_PAYER_KEY=0x... node pay.mjs URL [--network N] [--asset A] [--allow N/A ...]\n");
  process.exit(2);
}

const account = privateKeyToAccount(key);
const scheme = new ExactEvmScheme(account);
const upto = new UptoEvmScheme(account); // the x402 upto scheme (Permit2), for offers that ask for it
const client = new x402Client();
for (const network of values.networks.split(",")) {
  client.register(network.trim(), scheme);
  client.register(network.trim(), upto);
}

if (values["no-spend-controls"]) {
  client.setSpendControls(false);
} else if (values.allow) {
  const allowedAssets = values.allow.map((entry) => {
    const [network, asset] = entry.split("/");
    return { network, asset };
  });
  client.setSpendControls({ allowedAssets });
}

// The choice among several offers: a policy keeps only the preferred network and asset.
if (values.network || values.asset) {
  const wanted = (requirement) =>
    (!values.network || requirement.network === values.network) &&
    (!values.asset || requirement.asset.toLowerCase() === values.asset.toLowerCase());
  client.registerPolicy((_version, requirements) => requirements.filter(wanted));
}

let chosen = null;
client.onAfterPaymentCreation(async (context) => {
  chosen = context.selectedRequirements;
});

// The fetch the library calls: records the payment header it sends, byte for byte.
let paymentSignature = null;
const recordingFetch = async (request) => {
  paymentSignature = request.headers.get("PAYMENT-SIGNATURE") ?? paymentSignature;
  return fetch(request);
};

try {
  const response = await wrapFetchWithPayment(recordingFetch, client)(url);
  const text = await response.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = text;
  }
  const header = response.headers.get("PAYMENT-RESPONSE");
  const summary = {
    status: response.status,
    body,
    payer: account.address,
    chosen,
    paymentSignature,
    paymentResponse: header ? decodePaymentResponseHeader(header) : null,
    replay: response.headers.get("X402GW-Replay"),
  };
  process.stdout.write(JSON.stringify(summary) + "\n");
} catch (error) {
  process.stdout.write(JSON.stringify({ error: error instanceof Error ? error.message : String(error), chosen, paymentSignature }) + "\n");
  process.exit(1);
}
