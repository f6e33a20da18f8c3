import type { Event } from './index.js';

/** What a handler call can reach: the WIT imports of `weir:function`. */
export interface Host {
  stateGet(name: string): Uint8Array | undefined;
  stateSet(name: string, value: Uint8Array): void;
  stateDelete(name: string): void;
  publish(subject: string, payload: Uint8Array, headers: [string, string][]): void;
  log(level: 'trace' | 'debug' | 'info' | 'warn' | 'error', message: string): void;
  enterSpan(name: string): number;
  setAttribute(span: number, key: string, value: string): void;
  exitSpan(span: number): void;
}
export function installHost(next: Host | null): Host | null;
export function currentHost(): Host;
export function register<F extends (event: Event) => void>(fn: F): F;
export function registeredHandler(): (event: Event) => void;
