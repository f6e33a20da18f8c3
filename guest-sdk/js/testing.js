// @weir/sdk/testing: run a handler natively, as the host would, under Vitest
// or node:test. A call's state is scoped to the event's key; its state writes
// and emitted records are kept only if the handler returns, log lines and
// spans either way. `call` returns undefined or the Retry / Reject the host
// would have been told (anything else thrown is a Retry naming it).

import { Event, Reject, failureOf } from './index.js';
import { installHost } from './internal.js';

/** The host's limit on a state entry's name, in UTF-8 bytes. */
export const MAX_STATE_NAME_BYTES = 256;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** An event as the host would pass it. */
export function event(subject, key, payload, options = {}) {
  return new Event({ subject, key, payload, ...options });
}

class StateLimit extends Error {}

/** A test used the harness wrongly: thrown out of the call, not reported as its failure. */
export class HarnessMisuse extends Error {}

function nameProblem(name) {
  if (name.includes('\u0000')) return `state name ${JSON.stringify(name)} holds U+0000`;
  if (encoder.encode(name).length > MAX_STATE_NAME_BYTES) {
    return `state name is longer than ${MAX_STATE_NAME_BYTES} bytes`;
  }
  return undefined;
}

/** What one call has done so far; the Host the SDK reaches during it. */
class Call {
  constructor(state) {
    this.state = state;
    this.emitted = [];
    this.logs = [];
    this.spans = [];
    this.open = [];
    this.refused = undefined;
  }
  stateGet(name) {
    // A copy, as the host gives: changing it changes nothing stored.
    return this.state.get(name)?.slice();
  }
  stateSet(name, value) {
    const problem = nameProblem(name);
    if (problem) {
      this.refused ??= { problem, logs: this.logs.length };
      throw new StateLimit(problem);
    }
    this.state.set(name, Uint8Array.from(value));
  }
  stateDelete(name) {
    this.state.delete(name);
  }
  publish(subject, payload, headers) {
    this.emitted.push(new Emitted(subject, Uint8Array.from(payload), headers));
  }
  log(level, message) {
    this.logs.push([level, message]);
  }
  enterSpan(name) {
    const parent = this.open.length ? this.open[this.open.length - 1] : undefined;
    this.spans.push({ name, parent, attributes: {}, closed: false });
    this.open.push(this.spans.length - 1);
    return this.spans.length; // handles start at 1; 0 is the inert handle
  }
  setAttribute(span, key, value) {
    if (this.open.includes(span - 1)) this.spans[span - 1].attributes[key] = value;
  }
  exitSpan(span) {
    const cut = this.open.indexOf(span - 1);
    if (cut < 0) return;
    for (const index of this.open.slice(cut)) this.spans[index].closed = true;
    this.open.length = cut;
  }
}

/** A record a successful call published. */
export class Emitted {
  constructor(subject, payload, headers) {
    this.subject = subject;
    this.payload = payload;
    this.headers = headers;
  }
  text() {
    return decoder.decode(this.payload);
  }
  json() {
    return JSON.parse(this.text());
  }
}

/** In-memory state per key, the records successful calls emitted, every log line and span. */
export class Harness {
  constructor() {
    this.store = new Map();
    this.emitted = [];
    this.logs = [];
    this.spans = [];
  }
  withState(key, name, value) {
    const entries = this.store.get(key) ?? new Map();
    entries.set(name, typeof value === 'string' ? encoder.encode(value) : Uint8Array.from(value));
    this.store.set(key, entries);
    return this;
  }
  withJsonState(key, name, value) {
    return this.withState(key, name, JSON.stringify(value));
  }
  /** Runs `handle(ev)` as one host call scoped to `ev.key`. */
  call(handle, ev) {
    return this.callAs(ev.key, () => handle(ev));
  }
  /** Runs `run` as one host call scoped to `key`. */
  callAs(key, run) {
    const context = new Call(new Map(this.store.get(key) ?? []));
    const previous = installHost(context);
    if (previous !== null) {
      installHost(previous);
      throw new HarnessMisuse('Harness.call cannot be nested inside another handler call');
    }
    let failure;
    try {
      const returned = run();
      if (returned && typeof returned.then === 'function') {
        failure = new Reject('a handler is synchronous: it returned a Promise');
      }
    } catch (thrown) {
      if (thrown instanceof HarnessMisuse) throw thrown;
      failure = thrown instanceof StateLimit ? new Reject(`state limit: ${thrown.message}`) : failureOf(thrown);
    } finally {
      installHost(null);
    }
    if (context.refused !== undefined) {
      // The host ends the call at the refused write (a trap the guest
      // cannot catch): whatever the handler did after it does not count.
      failure = new Reject(`state limit: ${context.refused.problem}`);
      context.logs.length = context.refused.logs;
    }
    this.logs.push(...context.logs);
    const offset = this.spans.length;
    for (const span of context.spans) {
      this.spans.push({ ...span, parent: span.parent === undefined ? undefined : span.parent + offset });
    }
    if (failure === undefined) {
      if (context.state.size) this.store.set(key, context.state);
      else this.store.delete(key);
      this.emitted.push(...context.emitted);
    }
    return failure;
  }
  state(key, name) {
    return this.store.get(key)?.get(name);
  }
  jsonState(key, name) {
    const raw = this.state(key, name);
    return raw === undefined ? undefined : JSON.parse(decoder.decode(raw));
  }
  takeEmitted() {
    const taken = this.emitted;
    this.emitted = [];
    return taken;
  }
}
