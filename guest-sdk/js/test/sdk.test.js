// The JavaScript SDK and its harness behave as the host does.
import { runInNewContext } from 'node:vm';
import { describe, expect, it } from 'vitest';
import { Event, Reject, Retry, emit, handler, log, state, trace } from '../index.js';
import { Harness, MAX_STATE_NAME_BYTES, event } from '../testing.js';

function counting(ev) {
  state.setJson('n', (state.getJson('n') ?? 0) + 1);
  emit.publish('out', ev.payload, [['k', ev.key]]);
  if (ev.text() === 'fail') throw new Retry('asked to fail');
}

describe('Harness', () => {
  it('discards a failed call\'s writes and emits but keeps its logs and spans', () => {
    const noisy = (ev) => {
      log.info('before');
      trace.inSpan('work', () => counting(ev));
    };
    const h = new Harness();
    expect(h.call(noisy, event('in', 'k', 'ok'))).toBeUndefined();
    const failure = h.call(noisy, event('in', 'k', 'fail'));
    expect(failure).toBeInstanceOf(Retry);
    expect(failure.reason).toBe('asked to fail');
    expect(h.jsonState('k', 'n')).toBe(1);
    expect(h.emitted.map((e) => e.text())).toEqual(['ok']);
    expect(h.logs).toEqual([['info', 'before'], ['info', 'before']]);
    expect(h.spans.map((s) => [s.name, s.closed])).toEqual([['work', true], ['work', true]]);
  });

  it('scopes state to the key', () => {
    const h = new Harness();
    h.call(counting, event('in', 'a', '1'));
    h.call(counting, event('in', 'a', '2'));
    h.call(counting, event('in', 'b', '3'));
    expect([h.jsonState('a', 'n'), h.jsonState('b', 'n')]).toEqual([2, 1]);
  });

  it('retries an uncaught error and names it', () => {
    const h = new Harness();
    const failure = h.call(() => {
      state.set('x', '1');
      null.boom;
    }, event('in', 'k', ''));
    expect(failure).toBeInstanceOf(Retry);
    expect(failure.reason).toMatch(/^uncaught TypeError: /);
    expect(h.state('k', 'x')).toBeUndefined();
  });

  it('fails a call whose state name the host refuses, even if the handler catches it', () => {
    const h = new Harness();
    const failure = h.call(() => {
      state.set('ok', '1');
      try {
        state.set('a'.repeat(MAX_STATE_NAME_BYTES + 1), '1');
      } catch {}
    }, event('in', 'k', ''));
    expect(failure).toBeInstanceOf(Reject);
    expect(failure.reason).toContain('longer than 256 bytes');
    expect(h.state('k', 'ok')).toBeUndefined();
    expect(h.call(() => state.set('a\u0000b', ''), event('in', 'k', ''))).toBeInstanceOf(Reject);
  });

  it('deletes, and rejects corrupt JSON state naming it', () => {
    const h = new Harness().withState('k', 'bad', '{').withState('k', 'gone', '1');
    expect(h.call(() => state.delete('gone'), event('in', 'k', ''))).toBeUndefined();
    expect(h.state('k', 'gone')).toBeUndefined();
    const failure = h.call(() => state.getJson('bad'), event('in', 'k', ''));
    expect(failure.reason).toContain('"bad"');
  });

  it('fails a call at a refused state name whatever the handler throws after', () => {
    const h = new Harness();
    const failure = h.call(() => {
      try {
        state.set('a\u0000b', '');
      } catch {
        log.info('after the refusal');
        throw new Retry('db');
      }
    }, event('in', 'k', ''));
    expect(failure).toBeInstanceOf(Reject);
    expect(failure.reason).toContain('state limit');
    expect(h.logs).toEqual([]);
  });

  it('hands out a copy of stored bytes, as the host does', () => {
    const h = new Harness().withState('k', 'c', new Uint8Array([1]));
    const failure = h.call(() => {
      state.get('c')[0] = 9;
      throw new Retry('no');
    }, event('in', 'k', ''));
    expect(failure).toBeInstanceOf(Retry);
    expect([...h.state('k', 'c')]).toEqual([1]);
  });

  it('makes every reason a string', () => {
    expect(new Reject(42).reason).toBe('42');
    expect(new Retry().reason).toBe('');
  });

  it('refuses a Promise: handlers are synchronous', () => {
    const h = new Harness();
    const failure = h.call(async () => state.set('x', '1'), event('in', 'k', ''));
    expect(failure).toBeInstanceOf(Reject);
    expect(failure.reason).toContain('synchronous');
  });

  it('nests spans, and a parent closes its children', () => {
    const h = new Harness();
    h.call(() => {
      const outer = trace.span('outer');
      const inner = trace.span('inner');
      inner.setAttribute('n', 3);
      outer.end();
      inner.setAttribute('late', 'ignored');
    }, event('in', 'k', ''));
    expect(h.spans).toEqual([
      { name: 'outer', parent: undefined, attributes: {}, closed: true },
      { name: 'inner', parent: 0, attributes: { n: '3' }, closed: true },
    ]);
  });

  it('does not nest calls', () => {
    const h = new Harness();
    expect(() => h.call((ev) => h.call(counting, ev), event('in', 'k', ''))).toThrow(/cannot be nested/);
  });

  it('says why outside a call', () => {
    expect(() => state.get('x')).toThrow(/only during a handler call/);
  });

  it('publishes JSON with its content type, and rejects what JSON cannot hold', () => {
    const h = new Harness();
    h.call(() => emit.publishJson('out', { b: [1, 2] }), event('in', 'k', ''));
    expect([h.emitted[0].text(), h.emitted[0].headers]).toEqual(['{"b":[1,2]}', [['content-type', 'application/json']]]);
    const failure = h.call(() => emit.publishJson('out', { n: 1n }), event('in', 'k', ''));
    expect(failure.reason).toContain('cannot encode');
  });
});

describe('Event', () => {
  it('converts the WIT u64/s64 BigInts exactly, and rejects what a number cannot hold', () => {
    const ev = new Event({ subject: 's', key: 'k', payload: '{"a":1}', eventTimeMs: 5n, sequence: 9n, headers: [['Content-Type', 'x']] });
    expect([ev.eventTimeMs, ev.sequence, ev.json(), ev.header('content-type'), ev.header('other')]).toEqual([5, 9, { a: 1 }, 'x', undefined]);
    expect(() => new Event({ subject: 's', key: 'k', payload: '', sequence: 2n ** 60n })).toThrow(Reject);
    expect(() => event('in', 'k', '', { sequence: 2 ** 60 })).toThrow(Reject);
    expect(() => event('in', 'k', '{').json()).toThrow(/not valid JSON/);
    expect(() => event('in', 'k', new Uint8Array([0xff])).text()).toThrow(/not UTF-8/);
  });

  it('takes bytes from another realm, as componentize-js lifts list<u8>', () => {
    const foreign = runInNewContext('new Uint8Array([123, 125])');
    expect(foreign instanceof Uint8Array).toBe(false);
    const ev = new Event({ subject: 's', key: 'k', payload: foreign });
    expect(ev.json()).toEqual({});
    expect(new Event({ subject: 's', key: 'k', payload: new Uint8Array([49]).buffer }).text()).toBe('1');
    const h = new Harness();
    expect(h.call(() => emit.publish('out', foreign), event('in', 'k', ''))).toBeUndefined();
    expect(h.emitted[0].text()).toBe('{}');
  });

  it('allows one handler per component', () => {
    const first = (ev) => counting(ev);
    expect(handler(first)).toBe(first);
    expect(handler(first)).toBe(first);
    expect(() => handler(() => {})).toThrow(/one handler/);
  });
});
