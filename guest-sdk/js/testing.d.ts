import type { Event, EventInit, HandlerError, Handler, Headers, Level, Payload } from './index.js';

export declare const MAX_STATE_NAME_BYTES: number;
/** A test used the harness wrongly (a nested call). */
export declare class HarnessMisuse extends Error {}
/** An event as the host would pass it. */
export declare function event(
  subject: string,
  key: string,
  payload: Payload,
  options?: Omit<EventInit, 'subject' | 'key' | 'payload'>,
): Event;

export declare class Emitted {
  readonly subject: string;
  readonly payload: Uint8Array;
  readonly headers: Headers;
  text(): string;
  json<T = unknown>(): T;
}

export interface RecordedSpan {
  name: string;
  /** Index in `Harness.spans` of the enclosing span. */
  parent: number | undefined;
  attributes: Record<string, string>;
  closed: boolean;
}

export declare class Harness {
  constructor();
  withState(key: string, name: string, value: Payload): this;
  withJsonState(key: string, name: string, value: unknown): this;
  /** Runs `handle(ev)` as one host call scoped to `ev.key`: undefined, or the failure the host would see. */
  call(handle: Handler, ev: Event): HandlerError | undefined;
  callAs(key: string, run: () => void): HandlerError | undefined;
  state(key: string, name: string): Uint8Array | undefined;
  jsonState<T = unknown>(key: string, name: string): T | undefined;
  /** Records emitted by successful calls, in order. */
  emitted: Emitted[];
  /** Every log line, failed calls' too. */
  logs: [Level, string][];
  spans: RecordedSpan[];
  takeEmitted(): Emitted[];
}
