#!/usr/bin/env bash
# Makes sure a machine can build and test guests in languages other than
# Rust: Node.js >= 18 with npm (the TypeScript/JavaScript SDK and examples
# install their own packages with `npm ci`), a Python venv holding
# componentize-py and pytest under /opt/weir-tools (override with
# WEIR_PYTHON_GUESTS), and clang-19 with lld-19, wasi-libc, the wasm32
# compiler runtime and libc++ for C and C++, plus a native cc and c++ for
# their unit tests. Installs with apt-get and pip when something is
# missing; idempotent; prints what it did.
set -euo pipefail

say() { echo "ensure-guest-toolchains: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

node_major() { node --version 2>/dev/null | sed -n 's/^v\([0-9]*\).*/\1/p'; }
if [ -z "$(node_major)" ] || [ "$(node_major)" -lt 18 ] || ! command -v npm >/dev/null; then
  say "installing Node.js and npm (apt)"
  apt_install nodejs npm
fi

c_ok() {
  command -v cc >/dev/null && command -v c++ >/dev/null && command -v clang-19 >/dev/null \
    && command -v clang++-19 >/dev/null && command -v wasm-ld-19 >/dev/null \
    && [ -e /usr/include/wasm32-wasi/stdio.h ] \
    && ls /usr/lib/wasm32-wasi/libc++.a >/dev/null 2>&1 \
    && ls /usr/lib/llvm-19/lib/clang/19/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1
}
if ! c_ok; then
  say "installing clang-19, lld-19, wasi-libc, libclang-rt-19-dev-wasm32 and libc++-19-dev-wasm32 (apt)"
  apt_install gcc g++ clang-19 lld-19 wasi-libc libclang-rt-19-dev-wasm32 \
    libc++-19-dev-wasm32 libc++abi-19-dev-wasm32
fi

COMPONENTIZE_PY_VERSION=0.25.1
PYTEST_VERSION=9.2.0
venv=${WEIR_PYTHON_GUESTS:-/opt/weir-tools/python-guests-$COMPONENTIZE_PY_VERSION}
if ! "$venv/bin/python" -c 'import componentize_py, pytest' 2>/dev/null; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    say "installing python3-venv (apt)"
    apt_install python3-venv
  fi
  say "creating $venv with componentize-py==$COMPONENTIZE_PY_VERSION and pytest==$PYTEST_VERSION (PyPI)"
  as_root mkdir -p "$(dirname "$venv")"
  # A venv records its own path, so it is built where it lives; a failed
  # install leaves no venv behind to be taken for a good one.
  rm -rf "$venv"
  python3 -m venv "$venv"
  if ! PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/pip" install --quiet \
    "componentize-py==$COMPONENTIZE_PY_VERSION" "pytest==$PYTEST_VERSION"; then
    rm -rf "$venv"
    say "could not install componentize-py and pytest from PyPI"
    exit 1
  fi
fi
