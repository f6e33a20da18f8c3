#!/usr/bin/env node
// weir-build <handler.ts|js> [-o out.wasm] [--wit dir]
//
// Builds a handler module into a Weir component: esbuild bundles it with
// @weir/sdk into one ES module (TypeScript is compiled on the way), leaving
// the `weir:` imports to the component; componentize-js then builds the
// `weir:function/event-handler` world from Weir's wit/. esbuild and
// componentize-js are the project's own devDependencies.

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, realpathSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const sdkDir = dirname(dirname(realpathSync(fileURLToPath(import.meta.url))));

function fail(message) {
  console.error(`weir-build: ${message}`);
  process.exit(1);
}

function parse(argv) {
  const args = { input: undefined, output: undefined, wit: process.env.WEIR_WIT ?? join(sdkDir, '..', '..', 'wit') };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-o' || arg === '--output') args.output = argv[++i];
    else if (arg === '--wit') args.wit = argv[++i];
    else if (arg === '-h' || arg === '--help') {
      console.log('usage: weir-build <handler.ts|js> [-o out.wasm] [--wit <Weir wit/ dir>]');
      process.exit(0);
    } else if (args.input === undefined) args.input = arg;
    else fail(`unexpected argument ${arg}`);
  }
  if (args.input === undefined) fail('which module? usage: weir-build <handler.ts|js> [-o out.wasm]');
  args.output ??= basename(args.input).replace(/\.[cm]?[jt]s$/, '') + '.wasm';
  return args;
}

// From the project's node_modules/.bin, or an enclosing one (npm workspaces).
function tool(name) {
  for (let dir = process.cwd(); ; dir = dirname(dir)) {
    const path = join(dir, 'node_modules', '.bin', name);
    if (existsSync(path)) return path;
    if (dirname(dir) === dir) break;
  }
  fail(`${name} is not installed in this project: npm install (it is a devDependency)`);
}

function run(command, args) {
  console.error(`+ ${[command, ...args].join(' ')}`);
  const result = spawnSync(command, args, { stdio: 'inherit' });
  if (result.status !== 0) fail(`${basename(command)} failed (${result.status ?? result.signal})`);
}

// The entry binds the SDK to the WIT imports, loads the handler module (its
// handler() call declares the function) and exports the world's `handle`.
function entrySource(handlerPath) {
  return `import { get, set, delete as remove } from 'weir:function/state@0.1.0';
import { publish } from 'weir:function/emit@0.1.0';
import { log } from 'weir:function/log@0.1.0';
import { enterSpan, setAttribute, exitSpan } from 'weir:function/trace@0.1.0';
import { installHost, registeredHandler } from '@weir/sdk/internal';
import { Event, Reject, failureOf } from '@weir/sdk';
import ${JSON.stringify(handlerPath)};

installHost({
  stateGet: get,
  stateSet: set,
  stateDelete: remove,
  publish,
  log,
  enterSpan,
  setAttribute,
  exitSpan,
});

export function handle(raw) {
  let failure;
  try {
    const returned = registeredHandler()(new Event(raw));
    if (returned && typeof returned.then === 'function') {
      failure = new Reject('a handler is synchronous: it returned a Promise');
    }
  } catch (thrown) {
    failure = failureOf(thrown);
  }
  if (failure !== undefined) throw { tag: failure.kind, val: failure.reason };
}
`;
}

const args = parse(process.argv.slice(2));
const input = resolve(args.input);
const output = resolve(args.output);
if (!existsSync(input)) fail(`no such module: ${args.input}`);
if (!existsSync(join(args.wit, 'function.wit'))) fail(`no function.wit in ${args.wit}; pass --wit <Weir's wit/ dir>`);

// Inside the project, so that @weir/sdk resolves from its node_modules.
const work = join(process.cwd(), '.weir-build');
rmSync(work, { recursive: true, force: true });
mkdirSync(work, { recursive: true });
writeFileSync(join(work, 'entry.js'), entrySource(input));
const bundle = join(work, 'bundle.js');
run(tool('esbuild'), [
  join(work, 'entry.js'),
  '--bundle',
  '--format=esm',
  '--platform=neutral',
  '--target=es2022',
  '--external:weir:*',
  `--outfile=${bundle}`,
  '--log-level=warning',
]);
mkdirSync(dirname(output), { recursive: true });
// -d http fetch-event: StarlingMonkey's HTTP and fetch-event support would
// import wasi:http, which Weir does not link.
run(tool('componentize-js'), [
  '--wit', args.wit,
  '-n', 'event-handler',
  '-d', 'http', 'fetch-event',
  '-o', output,
  bundle,
]);
console.error(`built ${output} (${(statSync(output).size / 1e6).toFixed(1)} MB)`);
