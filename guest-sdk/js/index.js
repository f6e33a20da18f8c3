// @weir/sdk: write Weir stream functions in TypeScript or JavaScript.
//
// A module declares its function with `handler(fn)`; `weir-build` bundles it
// with esbuild and builds a component for `weir:function/event-handler` with
// componentize-js; `@weir/sdk/testing` runs it natively under Vitest or
// node:test. The WIT contract is Weir's `wit/`.

import { currentHost, register } from './internal.js';

const encoder = new TextEncoder();
const decoder = new TextDecoder('utf-8', { fatal: true });

/** A handler's failure with a reason the host records. */
export class HandlerError extends Error {
  constructor(kind, reason) {
    // The WIT reason is a string: anything else would trap when lowered.
    const text = String(reason ?? '');
    super(text);
    this.name = new.target.name;
    this.kind = kind;
    this.reason = text;
  }
}

/** A passing failure: the host backs off and delivers the event again. */
export class Retry extends HandlerError {
  constructor(reason) {
    super('retry', reason);
  }
}

/** The event can never succeed: the host dead-letters it now, with the reason. */
export class Reject extends HandlerError {
  constructor(reason) {
    super('reject', reason);
  }
}

/**
 * What the host is told for a value a handler threw: `Retry` and `Reject`
 * as they are; anything else is a bug the host cannot tell from a passing
 * failure, so it is retried like a trap, with the error named.
 */
export function failureOf(thrown) {
  if (thrown instanceof HandlerError) return thrown;
  const name = thrown instanceof Error ? thrown.name : typeof thrown;
  const message = thrown instanceof Error ? thrown.message : String(thrown);
  return new Retry(`uncaught ${name}: ${message}`);
}

/** Bytes as a Uint8Array, from a string (UTF-8) or any byte container:
 * componentize-js lifts a WIT `list<u8>` to a typed array of its own realm,
 * which `instanceof Uint8Array` does not recognize. */
function bytesOf(payload) {
  if (typeof payload === 'string') return encoder.encode(payload);
  if (payload instanceof Uint8Array) return payload;
  if (ArrayBuffer.isView(payload)) {
    return new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength);
  }
  if (payload instanceof ArrayBuffer) return new Uint8Array(payload);
  if (Array.isArray(payload)) return Uint8Array.from(payload);
  throw new TypeError(`a payload is a string or bytes, not ${Object.prototype.toString.call(payload)}`);
}

/** Exactly representable as a JS number, or rejected: no silent rounding.
 * (componentize-js hands over u64/s64 as BigInt; tests may pass numbers.) */
function exactNumber(value, what) {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || (typeof value === 'bigint' && BigInt(n) !== value)) {
    throw new Reject(`${what} ${value} is beyond 2^53, where a JavaScript number is not exact`);
  }
  return n;
}

/** One input record, with the key and time the binding extracted. */
export class Event {
  constructor({ subject, key, payload, headers = [], eventTimeMs = 0, sequence = 0 }) {
    this.subject = subject;
    this.key = key;
    this.payload = bytesOf(payload);
    this.headers = headers.map(([name, value]) => [name, value]);
    this.eventTimeMs = exactNumber(eventTimeMs, 'event time');
    this.sequence = exactNumber(sequence, 'sequence');
  }

  /** The payload as UTF-8; an event that is not is rejected. */
  text() {
    try {
      return decoder.decode(this.payload);
    } catch (e) {
      throw new Reject(`payload is not UTF-8: ${e.message}`);
    }
  }

  /** The payload decoded from JSON; an event that does not decode is rejected. */
  json() {
    const text = this.text();
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new Reject(`payload is not valid JSON: ${e.message}`);
    }
  }

  /** The first header called `name`, in any case. */
  header(name) {
    const lowered = name.toLowerCase();
    const found = this.headers.find(([n]) => n.toLowerCase() === lowered);
    return found === undefined ? undefined : found[1];
  }
}

/** Declares `fn` as the function's handler (a component has one) and returns it. */
export function handler(fn) {
  return register(fn);
}

function encodeJson(value, what) {
  let text;
  try {
    text = JSON.stringify(value);
  } catch (e) {
    throw new Reject(`cannot encode ${what} as JSON: ${e.message}`);
  }
  if (text === undefined) throw new Reject(`cannot encode ${what} as JSON: nothing to encode`);
  return encoder.encode(text);
}

/** Keyed state: entries of the current event's key only. */
export const state = {
  get(name) {
    const value = currentHost().stateGet(name);
    return value === undefined || value === null ? undefined : bytesOf(value);
  },
  set(name, value) {
    currentHost().stateSet(name, bytesOf(value));
  },
  delete(name) {
    currentHost().stateDelete(name);
  },
  getJson(name) {
    const raw = state.get(name);
    if (raw === undefined) return undefined;
    try {
      return JSON.parse(decoder.decode(raw));
    } catch (e) {
      throw new Reject(`state entry "${name}" is not valid JSON: ${e.message}`);
    }
  },
  setJson(name, value) {
    state.set(name, encodeJson(value, `state entry "${name}"`));
  },
};

const JSON_HEADERS = [['content-type', 'application/json']];

/** Output records, to the subjects the function's binding declares. */
export const emit = {
  publish(subject, payload, headers = []) {
    currentHost().publish(
      subject,
      bytesOf(payload),
      headers.map(([name, value]) => [String(name), String(value)]),
    );
  },
  publishJson(subject, value) {
    emit.publish(subject, encodeJson(value, `the record for "${subject}"`), JSON_HEADERS);
  },
};

const LEVELS = ['trace', 'debug', 'info', 'warn', 'error'];

/** Log lines, attributed by the host to the function, version and key. */
export const log = {
  log(level, message) {
    if (!LEVELS.includes(level)) {
      throw new TypeError(`log level ${level} is not one of ${LEVELS.join(', ')}`);
    }
    currentHost().log(level, String(message));
  },
  trace: (message) => log.log('trace', message),
  debug: (message) => log.log('debug', message),
  info: (message) => log.log('info', message),
  warn: (message) => log.log('warn', message),
  error: (message) => log.log('error', message),
};

/** An open span; `end()` closes it and every span opened inside it. */
export class Span {
  constructor(handle) {
    this.handle = handle;
    this.open = handle !== 0;
  }
  setAttribute(key, value) {
    if (this.open) currentHost().setAttribute(this.handle, key, String(value));
  }
  end() {
    if (this.open) {
      this.open = false;
      currentHost().exitSpan(this.handle);
    }
  }
}

/** Spans of the handler's own work, nested under the invocation's span. */
export const trace = {
  /** Opens a span inside the innermost span still open; close it with `end()`. */
  span(name) {
    return new Span(currentHost().enterSpan(name));
  },
  /** Runs `fn(span)` inside a span named `name`, closing it however `fn` ends. */
  inSpan(name, fn) {
    const span = trace.span(name);
    try {
      return fn(span);
    } finally {
      span.end();
    }
  },
};
