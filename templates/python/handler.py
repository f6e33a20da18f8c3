"""{{name}}: counts the events of each key and publishes the running count to
{{name}}.counts. An event that is not JSON is rejected (the host dead-letters
it with the reason)."""

from weir_sdk import Event, emit, handler, state

OUTPUT_SUBJECT = "{{name}}.counts"


@handler
def handle(event: Event) -> None:
    event.json()
    count = (state.get_json("count") or 0) + 1
    state.set_json("count", count)
    emit.publish_json(OUTPUT_SUBJECT, {"key": event.key, "count": count, "sequence": event.sequence})
