#!/bin/sh
# PgBouncer for the SA Toolkit's HA endpoint.
#
#   entrypoint.sh [serve]                  render the configuration, then exec PgBouncer (default)
#   entrypoint.sh route HOST PORT DB [EPOCH] persist a new upstream (and its epoch), then RELOAD;
#                                          refused (exit 3) below the persisted epoch
#   entrypoint.sh target                   print the persisted databases file
#   entrypoint.sh show                     print "host port dbname paused disabled epoch" as PgBouncer sees it
#   entrypoint.sh pause [SECONDS]          PAUSE the routed database, RESUME again if it takes longer
#   entrypoint.sh resume | kill            RESUME / KILL the routed database
#
# The failover's fly router runs route/pause/resume/show/kill in every machine through the Fly
# Machines API exec endpoint; the local stack's file router does the same through the file and
# the admin console.
#
# The routed database is written to $PGBOUNCER_STATE_DIR/databases.ini, which pgbouncer.ini
# %includes. On Fly.io that directory is a volume, so after a failover a restarted machine boots
# onto the new primary instead of the env default. The local test stack runs this same script.
set -eu

: "${PGBOUNCER_TEMPLATE_DIR:=$(cd "$(dirname "$0")" && pwd)}"
: "${PGBOUNCER_CONF_DIR:=/etc/pgbouncer/run}"
: "${PGBOUNCER_STATE_DIR:=/data}"
: "${PGBOUNCER_BIN:=pgbouncer}"
: "${PGBOUNCER_DATABASE:=postgres}"
: "${PGBOUNCER_ADMIN_USER:=pgbouncer_admin}"
: "${UPSTREAM_PORT:=5432}"
: "${UPSTREAM_DBNAME:=postgres}"
: "${LISTEN_ADDR:=0.0.0.0}"
: "${LISTEN_PORT:=5432}"
: "${SOCKET_DIR:=/tmp}"
: "${MAX_CLIENT_CONN:=1000}"
: "${DEFAULT_POOL_SIZE:=20}"
: "${MAX_DB_CONNECTIONS:=0}"
: "${QUERY_WAIT_TIMEOUT:=120}"
: "${SERVER_TLS_SSLMODE:=require}"
: "${CLIENT_TLS_SSLMODE:=}"
: "${VERBOSE:=0}"

DATABASES_FILE="$PGBOUNCER_STATE_DIR/databases.ini"

log() { printf 'entrypoint: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# Values end up in an ini file: refuse anything that could inject another line or key.
check_value() {
  case "$2" in
    *"
"* | *" "* | *";"* | *"="*) die "$1 must not contain spaces, '=', ';' or newlines" ;;
    "") die "$1 must not be empty" ;;
  esac
}

databases_line() {
  check_value PGBOUNCER_DATABASE "$PGBOUNCER_DATABASE"
  check_value host "$1"
  check_value port "$2"
  check_value dbname "$3"
  printf '%s = host=%s port=%s dbname=%s\n' "$PGBOUNCER_DATABASE" "$1" "$2" "$3"
}

# Atomic replace: write a sibling temp file, then rename over the old one.
write_target() {
  mkdir -p "$PGBOUNCER_STATE_DIR"
  tmp="$DATABASES_FILE.tmp.$$"
  {
    printf ';; routed database, written by entrypoint.sh or the failover router\n'
    if [ -n "${4:-}" ]; then
      case "$4" in *[!0-9]*) die "epoch must be a number" ;; esac
      printf ';; epoch=%s\n' "$4"
    fi
    databases_line "$1" "$2" "$3"
  } >"$tmp"
  mv -f "$tmp" "$DATABASES_FILE"
}

admin_psql() {
  : "${PGBOUNCER_ADMIN_PASSWORD:?PGBOUNCER_ADMIN_PASSWORD is required}"
  PGPASSWORD="$PGBOUNCER_ADMIN_PASSWORD" psql -X -q -h "$SOCKET_DIR" -p "$LISTEN_PORT" \
    -U "$PGBOUNCER_ADMIN_USER" -d pgbouncer "$@"
}

render() {
  awk '{
    while (match($0, /@PGB_[A-Z_]+@/)) {
      key = substr($0, RSTART + 1, RLENGTH - 2)
      $0 = substr($0, 1, RSTART - 1) ENVIRON[key] substr($0, RSTART + RLENGTH)
    }
    print
  }' "$1" >"$2.tmp"
  mv -f "$2.tmp" "$2"
}

userlist_line() {
  # The auth file quotes with "; a literal " is written twice.
  printf '"%s" "%s"\n' "$(printf '%s' "$1" | sed 's/"/""/g')" "$(printf '%s' "$2" | sed 's/"/""/g')"
}

serve() {
  # In the image the machine starts us as root: prepare the volume, then run as RUN_AS_USER
  # (PgBouncer refuses to run as root). The local stack already runs us unprivileged.
  if [ "$(id -u)" = 0 ] && [ -n "${RUN_AS_USER:-}" ]; then
    mkdir -p "$PGBOUNCER_CONF_DIR" "$PGBOUNCER_STATE_DIR" "$SOCKET_DIR"
    chown -R "$RUN_AS_USER" "$PGBOUNCER_CONF_DIR" "$PGBOUNCER_STATE_DIR" "$SOCKET_DIR"
    exec setpriv --reuid="$RUN_AS_USER" --regid="$RUN_AS_USER" --init-groups -- "$0" serve
  fi
  : "${DATABASE_USER:?DATABASE_USER is required}"
  : "${DATABASE_PASSWORD:?DATABASE_PASSWORD is required}"
  : "${PGBOUNCER_ADMIN_PASSWORD:?PGBOUNCER_ADMIN_PASSWORD is required}"
  mkdir -p "$PGBOUNCER_CONF_DIR" "$PGBOUNCER_STATE_DIR" "$SOCKET_DIR"
  [ -w "$PGBOUNCER_STATE_DIR" ] || die "$PGBOUNCER_STATE_DIR is not writable by $(id -un)"

  if [ -s "$DATABASES_FILE" ] && grep -q "^$PGBOUNCER_DATABASE = host=" "$DATABASES_FILE"; then
    log "using the persisted upstream: $(grep "^$PGBOUNCER_DATABASE = " "$DATABASES_FILE" | sed 's/ dbname=.*//')"
  else
    : "${UPSTREAM_HOST:?UPSTREAM_HOST is required on first start}"
    write_target "$UPSTREAM_HOST" "$UPSTREAM_PORT" "$UPSTREAM_DBNAME"
    log "first start: routing $PGBOUNCER_DATABASE to $UPSTREAM_HOST:$UPSTREAM_PORT"
  fi

  umask 077
  auth_file="$PGBOUNCER_CONF_DIR/userlist.txt"
  {
    userlist_line "$DATABASE_USER" "$DATABASE_PASSWORD"
    userlist_line "$PGBOUNCER_ADMIN_USER" "$PGBOUNCER_ADMIN_PASSWORD"
  } >"$auth_file.tmp"
  mv -f "$auth_file.tmp" "$auth_file"

  tls_files=""
  if [ -n "${CLIENT_TLS_CERT:-}" ] && [ -n "${CLIENT_TLS_KEY:-}" ]; then
    printf '%s\n' "$CLIENT_TLS_CERT" >"$PGBOUNCER_CONF_DIR/client.crt"
    printf '%s\n' "$CLIENT_TLS_KEY" >"$PGBOUNCER_CONF_DIR/client.key"
    tls_files="client_tls_cert_file = $PGBOUNCER_CONF_DIR/client.crt
client_tls_key_file = $PGBOUNCER_CONF_DIR/client.key"
    [ -n "$CLIENT_TLS_SSLMODE" ] || CLIENT_TLS_SSLMODE=require
  else
    [ -n "$CLIENT_TLS_SSLMODE" ] || CLIENT_TLS_SSLMODE=disable
    [ "$CLIENT_TLS_SSLMODE" = disable ] || die "CLIENT_TLS_SSLMODE=$CLIENT_TLS_SSLMODE needs CLIENT_TLS_CERT and CLIENT_TLS_KEY"
    log "client TLS is off: set CLIENT_TLS_CERT and CLIENT_TLS_KEY for connections over the internet"
  fi

  PGB_DATABASES_FILE="$DATABASES_FILE" \
  PGB_LISTEN_ADDR="$LISTEN_ADDR" \
  PGB_LISTEN_PORT="$LISTEN_PORT" \
  PGB_SOCKET_DIR="$SOCKET_DIR" \
  PGB_PID_FILE="$PGBOUNCER_CONF_DIR/pgbouncer.pid" \
  PGB_AUTH_FILE="$auth_file" \
  PGB_ADMIN_USER="$PGBOUNCER_ADMIN_USER" \
  PGB_MAX_CLIENT_CONN="$MAX_CLIENT_CONN" \
  PGB_DEFAULT_POOL_SIZE="$DEFAULT_POOL_SIZE" \
  PGB_MAX_DB_CONNECTIONS="$MAX_DB_CONNECTIONS" \
  PGB_QUERY_WAIT_TIMEOUT="$QUERY_WAIT_TIMEOUT" \
  PGB_SERVER_TLS_SSLMODE="$SERVER_TLS_SSLMODE" \
  PGB_CLIENT_TLS_SSLMODE="$CLIENT_TLS_SSLMODE" \
  PGB_CLIENT_TLS_FILES="$tls_files" \
  PGB_VERBOSE="$VERBOSE" \
    render "$PGBOUNCER_TEMPLATE_DIR/pgbouncer.ini.template" "$PGBOUNCER_CONF_DIR/pgbouncer.ini"

  log "starting PgBouncer on $LISTEN_ADDR:$LISTEN_PORT (admin console: database pgbouncer, user $PGBOUNCER_ADMIN_USER)"
  exec "$PGBOUNCER_BIN" "$PGBOUNCER_CONF_DIR/pgbouncer.ini"
}

# The persisted epoch (empty when none).
held_epoch() {
  sed -n 's/^;; epoch=\([0-9]*\)$/\1/p' "$DATABASES_FILE" 2>/dev/null | head -n 1
}

# An epoch names one primary: never route back to a lower epoch, nor elsewhere at the same one.
check_epoch_order() {
  held=$(held_epoch)
  [ -n "$held" ] && [ -n "${4:-}" ] || return 0
  case "$4" in *[!0-9]*) die "epoch must be a number" ;; esac
  if [ "$4" -lt "$held" ]; then
    log "refused: epoch $4 is older than the persisted epoch $held"
    exit 3
  fi
  if [ "$4" -eq "$held" ] && ! grep -q "^$PGBOUNCER_DATABASE = host=$1 port=$2 dbname=$3\$" "$DATABASES_FILE"; then
    log "refused: epoch $4 already routes $PGBOUNCER_DATABASE elsewhere"
    exit 3
  fi
}

route() {
  [ $# -eq 3 ] || [ $# -eq 4 ] || die "usage: entrypoint.sh route HOST PORT DBNAME [EPOCH]"
  check_epoch_order "$@"
  write_target "$@"
  admin_psql -c "RELOAD" >/dev/null
  log "routed $PGBOUNCER_DATABASE to $1:$2 (epoch ${4:-none}) and reloaded"
}

# SHOW DATABASES, read by column name (the column set differs between PgBouncer versions).
show() {
  epoch=$(held_epoch)
  admin_psql -A -F '|' -c "SHOW DATABASES" | awk -F '|' -v db="$PGBOUNCER_DATABASE" -v epoch="${epoch:--}" '
    NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    $col["name"] == db { print $col["host"], $col["port"], $col["database"], $col["paused"], $col["disabled"], epoch }'
}

pause_db() {
  seconds="${1:-10}"
  case "$seconds" in *[!0-9]*) die "seconds must be a number" ;; esac
  : "${PGBOUNCER_ADMIN_PASSWORD:?PGBOUNCER_ADMIN_PASSWORD is required}"
  # PAUSE waits for the pool to drain and has no timeout of its own: bound it, and RESUME if it
  # did not finish (a PAUSE outlives a disconnected admin client).
  if ! out=$(timeout "$seconds" env PGPASSWORD="$PGBOUNCER_ADMIN_PASSWORD" psql -X -q -h "$SOCKET_DIR" -p "$LISTEN_PORT" \
      -U "$PGBOUNCER_ADMIN_USER" -d pgbouncer -c "PAUSE $PGBOUNCER_DATABASE" 2>&1); then
    case "$out" in *"already suspended/paused"*) return 0 ;; esac
    admin_psql -c "RESUME $PGBOUNCER_DATABASE" >/dev/null 2>&1 || true
    die "PAUSE $PGBOUNCER_DATABASE did not finish within ${seconds}s; resumed"
  fi
}

resume_db() {
  if ! out=$(admin_psql -c "RESUME $PGBOUNCER_DATABASE" 2>&1); then
    case "$out" in *"not paused"*) return 0 ;; esac
    die "$out"
  fi
}

case "${1:-serve}" in
  serve) serve ;;
  route) shift; route "$@" ;;
  target) cat "$DATABASES_FILE" ;;
  show) show ;;
  pause) shift; pause_db "$@" ;;
  resume) resume_db ;;
  kill) admin_psql -c "KILL $PGBOUNCER_DATABASE" >/dev/null ;;
  *) die "unknown command: $1" ;;
esac
