// {{name}}: counts the events of each key and publishes the running count to
// {{name}}.counts. An event that is not JSON is rejected (the host
// dead-letters it with the reason).
import { type Event, emit, handler, state } from '@weir/sdk';

export const OUTPUT_SUBJECT = '{{name}}.counts';

export interface Count {
  key: string;
  count: number;
  sequence: number;
}

export const handle = handler((event: Event) => {
  event.json();
  const count = (state.getJson<number>('count') ?? 0) + 1;
  state.setJson('count', count);
  const out: Count = { key: event.key, count, sequence: event.sequence };
  emit.publishJson(OUTPUT_SUBJECT, out);
});
