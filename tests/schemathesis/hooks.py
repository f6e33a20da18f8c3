"""Schemathesis hooks for Weir's API (loaded through SCHEMATHESIS_HOOKS).

Module uploads are `application/wasm`, which schemathesis cannot generate on
its own: these bodies are what a client could send — a core module header
(refused: not a component), arbitrary bytes, or nothing at all.
"""

import schemathesis
from hypothesis import strategies as st

CORE_MODULE_HEADER = b"\x00asm\x01\x00\x00\x00"
COMPONENT_HEADER = b"\x00asm\x0d\x00\x01\x00"

schemathesis.openapi.media_type(
    "application/wasm",
    st.one_of(
        st.just(CORE_MODULE_HEADER),
        st.just(COMPONENT_HEADER),
        st.binary(max_size=256),
        st.binary(max_size=64).map(lambda tail: COMPONENT_HEADER + tail),
    ),
)
