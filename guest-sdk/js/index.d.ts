// Types of @weir/sdk. WIT mapping: list<u8> -> Uint8Array; option<T> -> T | undefined;
// u64 / s64 (sequence, event-time-ms) -> number, exact below 2^53 (beyond, the
// event is rejected rather than rounded); result<_, error> -> return, or throw
// Retry / Reject.

export type Payload = string | Uint8Array;
export type Headers = [string, string][];

export declare class HandlerError extends Error {
  readonly kind: 'retry' | 'reject';
  readonly reason: string;
}
/** A passing failure: the host backs off and delivers the event again. */
export declare class Retry extends HandlerError {
  constructor(reason: string);
  readonly kind: 'retry';
}
/** The event can never succeed: the host dead-letters it now, with the reason. */
export declare class Reject extends HandlerError {
  constructor(reason: string);
  readonly kind: 'reject';
}
/** What the host is told for a value a handler threw. */
export declare function failureOf(thrown: unknown): HandlerError;

export interface EventInit {
  subject: string;
  key: string;
  payload: Payload;
  headers?: Headers;
  eventTimeMs?: number | bigint;
  sequence?: number | bigint;
}

/** One input record, with the key and time the binding extracted. */
export declare class Event {
  constructor(init: EventInit);
  readonly subject: string;
  /** The key the binding extracted; state is scoped to it. */
  readonly key: string;
  readonly payload: Uint8Array;
  readonly headers: Headers;
  /** Event time in ms since the Unix epoch. */
  readonly eventTimeMs: number;
  /** The JetStream stream sequence: unique per stream, stable across redelivery. */
  readonly sequence: number;
  /** The payload as UTF-8; throws Reject if it is not. */
  text(): string;
  /** The payload decoded from JSON; throws Reject if it does not decode. */
  json<T = unknown>(): T;
  /** The first header called `name`, in any case. */
  header(name: string): string | undefined;
}

export type Handler = (event: Event) => void;
/** Declares the function's handler (a component has one) and returns it. */
export declare function handler<F extends Handler>(fn: F): F;

export declare const state: {
  get(name: string): Uint8Array | undefined;
  set(name: string, value: Payload): void;
  delete(name: string): void;
  /** Decoded from JSON; an entry that does not decode throws Reject naming it. */
  getJson<T = unknown>(name: string): T | undefined;
  setJson(name: string, value: unknown): void;
};

export declare const emit: {
  publish(subject: string, payload: Payload, headers?: Headers): void;
  /** As JSON, with `content-type: application/json`. */
  publishJson(subject: string, value: unknown): void;
};

export type Level = 'trace' | 'debug' | 'info' | 'warn' | 'error';
export declare const log: {
  log(level: Level, message: string): void;
  trace(message: string): void;
  debug(message: string): void;
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
};

export declare class Span {
  readonly handle: number;
  setAttribute(key: string, value: string | number | boolean): void;
  end(): void;
}
export declare const trace: {
  span(name: string): Span;
  inSpan<T>(name: string, fn: (span: Span) => T): T;
};
