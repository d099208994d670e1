#!/usr/bin/env node
// Compiles each contracts/<Source>.sol below with the pinned npm solc into
// contracts/build/<Contract>.json (one per contract it names), each source from its own compiler
// input, and writes the same bytes to
// gateway/devkit/contracts/<Contract>.json (package data: what an installed wheel deploys). The
// artifacts are committed so Python needs no compiler; `--check` recompiles and fails (exit 1)
// when either committed copy differs, which is how CI keeps source and artifacts in step.
"use strict";

const fs = require("fs");
const path = require("path");
const solc = require("solc");

// Source file (without .sol) → the contracts of it that get an artifact.
const SOURCES = {
  TestUSDC: ["TestUSDC"],
  BatchSettler: ["BatchSettler"],
  SmartWallet: ["SmartWallet", "SmartWalletFactory"],
  Eip7702Delegate: ["Eip7702Delegate"],
  Multicall3: ["Multicall3"],
  WalletDoubles: ["LyingWallet", "RevertingWallet"],
  Permit2: ["Permit2"],
  X402UptoPermit2Proxy: ["X402UptoPermit2Proxy"],
  X402ExactPermit2Proxy: ["X402ExactPermit2Proxy"],
  PlainToken: ["PlainToken"],
  X402BatchSettlement: ["X402BatchSettlement", "ERC3009DepositCollector"],
};
const EVM_VERSION = "cancun";

const sourcePath = (contract) => path.join(__dirname, `${contract}.sol`);
const ARTIFACT_DIRS = [path.join(__dirname, "build"), path.join(__dirname, "..", "gateway", "devkit", "contracts")];
const artifactPaths = (contract) => ARTIFACT_DIRS.map((dir) => path.join(dir, `${contract}.json`));

function compile(SOURCE) {
  const SOURCE_PATH = sourcePath(SOURCE);
  // Normalise line endings: the metadata hash at the end of the bytecode covers the source
  // text, and a CRLF checkout must not produce a different artifact.
  const content = fs.readFileSync(SOURCE_PATH, "utf8").replace(/\r\n/g, "\n");
  const input = {
    language: "Solidity",
    // A relative source name keeps the checkout directory out of the metadata.
    sources: { [`${SOURCE}.sol`]: { content } },
    settings: {
      evmVersion: EVM_VERSION,
      optimizer: { enabled: true, runs: 200 },
      outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const diagnostics = output.errors || [];
  for (const d of diagnostics) {
    process.stderr.write(d.formattedMessage || d.message);
  }
  if (diagnostics.some((d) => d.severity === "error")) {
    throw new Error("compilation failed");
  }
  const texts = {};
  for (const CONTRACT of SOURCES[SOURCE]) {
    const contract = output.contracts[`${SOURCE}.sol`][CONTRACT];
    const artifact = {
      contractName: CONTRACT,
      abi: contract.abi,
      bytecode: "0x" + contract.evm.bytecode.object,
      compiler: `solc ${solc.version().split("+")[0]}`,
      evmVersion: EVM_VERSION,
    };
    texts[CONTRACT] = JSON.stringify(artifact, null, 2) + "\n";
  }
  return texts;
}

function main(argv) {
  const check = argv.includes("--check");
  let status = 0;
  for (const source of Object.keys(SOURCES)) {
    status = Math.max(status, build(source, check));
  }
  return status;
}

function build(SOURCE, check) {
  let texts;
  try {
    texts = compile(SOURCE);
  } catch (err) {
    process.stderr.write(`compile.js: ${SOURCE}: ${err.message}\n`);
    return 2;
  }
  let status = 0;
  for (const [CONTRACT, text] of Object.entries(texts)) {
    for (const ARTIFACT_PATH of artifactPaths(CONTRACT)) {
      status = Math.max(status, write(CONTRACT, ARTIFACT_PATH, text, check));
    }
  }
  return status;
}

function write(CONTRACT, ARTIFACT_PATH, text, check) {
  if (check) {
    let committed = null;
    try {
      committed = fs.readFileSync(ARTIFACT_PATH, "utf8");
    } catch (err) {
      // fall through: a missing artifact is a difference
    }
    if (committed !== text) {
      process.stderr.write(
        `compile.js: ${path.relative(process.cwd(), ARTIFACT_PATH)} is out of date; ` +
          "run `node contracts/compile.js` and commit the result\n",
      );
      return 1;
    }
    process.stdout.write(`${CONTRACT}: ${path.relative(process.cwd(), ARTIFACT_PATH)} up to date\n`);
    return 0;
  }
  fs.mkdirSync(path.dirname(ARTIFACT_PATH), { recursive: true });
  fs.writeFileSync(ARTIFACT_PATH, text);
  process.stdout.write(`${CONTRACT}: wrote ${path.relative(process.cwd(), ARTIFACT_PATH)}\n`);
  return 0;
}

process.exitCode = main(process.argv.slice(2));
