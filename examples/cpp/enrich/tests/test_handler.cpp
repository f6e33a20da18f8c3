// enrich's unit tests, natively (c++ -DWEIR_TESTING), no Wasm: the C
// example's cases, against this handler.
#include "../src/handler.cpp"
#include "../../../c/enrich/tests/cases.inc"
