/* fraud-velocity's unit tests, natively (cc -DWEIR_TESTING), no Wasm. */
#include "../src/handler.c"
#include "cases.inc"
