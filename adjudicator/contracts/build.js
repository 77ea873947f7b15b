#!/usr/bin/env node
// Compiles src/*.sol with the pinned solc-js into artifacts/<Contract>.json
// (ABI + creation and runtime bytecode). Run by `cargo xtask contracts`;
// with --check it compiles in memory and fails if the committed artifacts differ.
'use strict';

const fs = require('fs');
const path = require('path');

const here = __dirname;
const modules = path.resolve(here, '..', '..', 'tools', 'node_modules');
const SOLC_VERSION = '0.8.37';
const CONTRACTS = ['Adjudicator', 'TicTacToeApp', 'AssetHolderETH', 'AssetHolderERC20', 'TestToken', 'TestFeeToken', 'HookToken', 'ReentryHook'];

let solc;
try {
  solc = require(path.join(modules, 'solc'));
} catch (e) {
  console.error(`solc-js not found in ${modules}: run cargo xtask setup`);
  process.exit(1);
}
if (!solc.version().startsWith(SOLC_VERSION + '+')) {
  console.error(`solc ${solc.version()} is not the pinned ${SOLC_VERSION}: run cargo xtask setup`);
  process.exit(1);
}

const srcDir = path.join(here, 'src');
const sources = {};
// src/*.sol and one level of subdirectories (src/apps/*.sol).
const files = fs.readdirSync(srcDir, { withFileTypes: true }).flatMap((e) =>
  e.isDirectory()
    ? fs.readdirSync(path.join(srcDir, e.name)).filter((f) => f.endsWith('.sol')).map((f) => `${e.name}/${f}`)
    : e.name.endsWith('.sol') ? [e.name] : [],
);
for (const f of files.sort()) {
  sources[`src/${f}`] = { content: fs.readFileSync(path.join(srcDir, f), 'utf8') };
}

const input = {
  language: 'Solidity',
  sources,
  settings: {
    optimizer: { enabled: true, runs: 1000000 },
    evmVersion: 'prague',
    viaIR: true,
    // No metadata hash: the bytecode depends only on the sources and settings.
    metadata: { bytecodeHash: 'none', appendCBOR: false },
    outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
  },
};

function findImports(p) {
  if (p.startsWith('@openzeppelin/')) {
    try {
      return { contents: fs.readFileSync(path.join(modules, p), 'utf8') };
    } catch (e) {
      return { error: `${p}: ${e.message} (run cargo xtask setup)` };
    }
  }
  return { error: `import not found: ${p}` };
}

const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
let failed = false;
for (const err of output.errors || []) {
  console.error(err.formattedMessage || err.message);
  if (err.severity === 'error') failed = true;
}
if (failed) process.exit(1);

const check = process.argv.includes('--check');
const outDir = path.join(here, 'artifacts');
if (!check) fs.mkdirSync(outDir, { recursive: true });
let differ = [];
for (const name of CONTRACTS) {
  const file = Object.keys(output.contracts).find((f) => output.contracts[f][name]);
  if (!file) {
    console.error(`contract ${name} missing from compiler output`);
    process.exit(1);
  }
  const c = output.contracts[file][name];
  const artifact = {
    contractName: name,
    compiler: `solc-js ${solc.version()}`,
    abi: c.abi,
    bytecode: '0x' + c.evm.bytecode.object,
    deployedBytecode: '0x' + c.evm.deployedBytecode.object,
  };
  const text = JSON.stringify(artifact, null, 2) + '\n';
  const target = path.join(outDir, `${name}.json`);
  if (check) {
    let current = null;
    try {
      current = fs.readFileSync(target, 'utf8');
    } catch (e) {}
    if (current !== text) differ.push(path.relative(process.cwd(), target));
  } else {
    fs.writeFileSync(target, text);
    console.log(`wrote ${path.relative(process.cwd(), target)} (${c.evm.deployedBytecode.object.length / 2} bytes runtime)`);
  }
}
if (differ.length > 0) {
  console.error(`committed artifacts differ from a rebuild: ${differ.join(', ')}; run cargo xtask contracts`);
  process.exit(1);
}
