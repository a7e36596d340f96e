#!/bin/sh
# PgBouncer for the SA Toolkit's HA endpoint.
#
#   entrypoint.sh [serve]                  boot check, render the configuration, exec PgBouncer (default)
#   entrypoint.sh route HOST PORT DB [EPOCH] persist a new upstream (and its epoch), then RELOAD;
#                                          refused (exit 3) below the persisted epoch
#   entrypoint.sh target                   print the persisted databases file
#   entrypoint.sh show                     print "host port dbname paused disabled epoch boot_check"
#                                          as PgBouncer sees it (exit 4: not serving yet)
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
#
# Boot check (serve). A machine that was stopped during a failover still holds the old route, so
# before PgBouncer starts the persisted route is checked against the failover functions:
#   ACTIVE_URLS         the failover function of each project, space- or comma-separated, e.g.
#                       https://<primary-ref>.supabase.co/functions/v1/failover; GET <url>/active
#                       answers {primary, epoch} (200) or 503 while no healthy primary exists
#   HEALTH_TOKEN        the bearer token /active accepts (never printed)
#   PRIMARY_UPSTREAM    host:port/dbname of site "primary" (PRIMARY_DB_URL's host), and
#   STANDBY_UPSTREAM    host:port/dbname of site "standby"
#   BOOT_CHECK_TIMEOUT  seconds to keep asking (default 60) before exiting non-zero
# An answer naming a primary at a higher epoch than the persisted one (or at the same epoch on
# another upstream) rewrites the route before PgBouncer starts. While every URL answers 503 or
# cannot be reached, or an answer's epoch is older than one another URL reported, PgBouncer does
# not start: after BOOT_CHECK_TIMEOUT the script exits 1 and Fly restarts the machine. Without
# ACTIVE_URLS the check is skipped with a warning: only for the local file-router stack, whose
# PgBouncer is never restarted behind a failover's back. Set ACTIVE_URLS once setup has routed
# the machines (before it, /active has no primary to answer).
#
# Admin console: only over the machine's local socket (auth_type hba: TCP logins of
# $PGBOUNCER_ADMIN_USER and to the pgbouncer database are rejected). ADMIN_OVER_TCP=1 opens it
# over TCP (scram-sha-256), for self-hosted file-router setups whose failover function cannot
# reach the socket; never on Fly.io, where the router uses exec.
#
# Client TLS: on by default. Give CLIENT_TLS_CERT and CLIENT_TLS_KEY (PEM), or set
# CLIENT_TLS_SSLMODE=disable explicitly (local stacks only); anything else refuses to start.
set -euf  # no globbing: URLs and values are data

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
: "${ADMIN_OVER_TCP:=0}"
: "${ACTIVE_URLS:=}"
: "${BOOT_CHECK_TIMEOUT:=60}"
: "${BOOT_CHECK_INTERVAL:=2}"
: "${VERBOSE:=0}"

DATABASES_FILE="$PGBOUNCER_STATE_DIR/databases.ini"
# Held (flock) while the route is decided or written: by `route` and by the boot check.
ROUTE_LOCK="$PGBOUNCER_STATE_DIR/.route.lock"
# Written, under the lock, once the boot check is done and PgBouncer is about to start: from then
# on a route must RELOAD; before it PgBouncer will read the persisted file when it starts.
SERVING_MARK="$PGBOUNCER_CONF_DIR/serving"

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

# Runs "$@" holding the route lock (a subshell: its exit status is the command's).
with_route_lock() {
  mkdir -p "$PGBOUNCER_STATE_DIR"
  (
    flock -w 10 9 || die "the route lock $ROUTE_LOCK is held by another command"
    "$@"
  ) 9>>"$ROUTE_LOCK"
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

# --- boot check ---------------------------------------------------------------------------------

# "host port dbname" of a site ("primary" or "standby") from PRIMARY_UPSTREAM / STANDBY_UPSTREAM.
site_upstream() {
  case "$1" in
    primary) spec="${PRIMARY_UPSTREAM:-}" ;;
    standby) spec="${STANDBY_UPSTREAM:-}" ;;
    *) die "boot check: unknown site '$1'" ;;
  esac
  case "$spec" in
    ?*:?*/?*) ;;
    *) die "boot check: $(echo "$1" | tr a-z A-Z)_UPSTREAM must be host:port/dbname" ;;
  esac
  host=${spec%%:*}
  rest=${spec#*:}
  port=${rest%%/*}
  dbname=${rest#*/}
  case "$port" in *[!0-9]*) die "boot check: the port of $1's upstream must be a number" ;; esac
  check_value "$1 upstream host" "$host"
  check_value "$1 upstream dbname" "$dbname"
  printf '%s %s %s\n' "$host" "$port" "$dbname"
}

# Asks one failover function: prints "<http code> <primary site or -> <epoch or ->".
ask_active() {
  # The token goes to curl on stdin, never on its command line (visible in ps).
  out=$(printf 'header = "Authorization: Bearer %s"\n' "$HEALTH_TOKEN" |
    curl -sS --config - --max-time 5 --connect-timeout 3 -w '\n%{http_code}' \
      "${1%/}/active" 2>/dev/null) || { echo "000 - -"; return 0; }
  code=$(printf '%s\n' "$out" | tail -n 1)
  json=$(printf '%s\n' "$out" | sed '$d')
  parsed=$(printf '%s' "$json" | jq -r '
      [ (if .primary == "primary" or .primary == "standby" then .primary else "-" end),
        (if (.epoch | type) == "number" and .epoch >= 0 then (.epoch | floor | tostring) else "-" end)
      ] | join(" ")' 2>/dev/null) || parsed="- -"
  printf '%s %s\n' "$code" "$parsed"
}

# Decides under the route lock: rewrites the persisted route to SITE at EPOCH when it is older
# (or elsewhere at the same epoch), keeps it when it is as new or newer, then marks PgBouncer as
# starting so later routes RELOAD it.
reconcile_locked() {
  site=$1 epoch=$2
  # shellcheck disable=SC2046 # three words
  set -- $(site_upstream "$site") "$epoch"
  held=$(held_epoch)
  if [ -z "$held" ] || [ "$epoch" -gt "$held" ] ||
    { [ "$epoch" -eq "$held" ] && ! route_is "$1" "$2" "$3"; }; then
    write_target "$@"
    log "boot check: reconciled: the persisted route (epoch ${held:-none}) now routes $PGBOUNCER_DATABASE to $site ($1:$2) at epoch $epoch"
  elif [ "$epoch" -eq "$held" ]; then
    log "boot check: the persisted route is current ($site at epoch $epoch)"
  else
    log "boot check: the persisted route (epoch $held) is newer than the active answer (epoch $epoch); kept"
  fi
  : >"$SERVING_MARK"
}

# One round over ACTIVE_URLS: prints "site epoch" of the primary to route to, or returns 1 while
# no answer names one (or a newer epoch was reported than the one named).
boot_check_once() {
  best_site="" best_epoch=-1 seen_epoch=-1
  for url in $(printf '%s' "$ACTIVE_URLS" | tr ',' ' '); do
    # shellcheck disable=SC2046 # three words
    set -- $(ask_active "$url")
    code=$1 site=$2 epoch=$3
    [ "$epoch" = - ] || [ "$epoch" -le "$seen_epoch" ] || seen_epoch=$epoch
    case "$code" in
      200)
        if [ "$site" != - ] && [ "$epoch" != - ]; then
          [ "$epoch" -le "$best_epoch" ] || { best_site=$site best_epoch=$epoch; }
        else
          log "boot check: $url/active answered 200 without a primary and an epoch"
        fi
        ;;
      503) log "boot check: $url/active: no healthy primary right now (503, epoch $epoch)" ;;
      000) log "boot check: $url/active cannot be reached" ;;
      *) log "boot check: $url/active answered HTTP $code" ;;
    esac
  done
  if [ -z "$best_site" ]; then
    return 1
  fi
  if [ "$best_epoch" -lt "$seen_epoch" ]; then
    log "boot check: $best_site is primary at epoch $best_epoch, but epoch $seen_epoch was reported: waiting"
    return 1
  fi
  printf '%s %s\n' "$best_site" "$best_epoch"
}

boot_check() {
  if [ -z "$ACTIVE_URLS" ]; then
    log "WARNING: ACTIVE_URLS is not set: the boot check is skipped and PgBouncer serves the persisted route unchecked (local file-router stacks only; set ACTIVE_URLS and HEALTH_TOKEN on Fly.io)"
    with_route_lock touch "$SERVING_MARK"
    return 0
  fi
  : "${HEALTH_TOKEN:?HEALTH_TOKEN is required with ACTIVE_URLS}"
  case "$HEALTH_TOKEN" in *[\"\\\ ]* | *"
"*) die "HEALTH_TOKEN must not contain quotes, backslashes, spaces or newlines" ;; esac
  case "$BOOT_CHECK_TIMEOUT$BOOT_CHECK_INTERVAL" in *[!0-9]*) die "BOOT_CHECK_TIMEOUT and BOOT_CHECK_INTERVAL are seconds" ;; esac
  site_upstream primary >/dev/null
  site_upstream standby >/dev/null
  deadline=$(($(date +%s) + BOOT_CHECK_TIMEOUT))
  until answer=$(boot_check_once); do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      die "boot check: no failover function named the current primary within ${BOOT_CHECK_TIMEOUT}s: not serving (the machine restarts and asks again)"
    fi
    sleep "$BOOT_CHECK_INTERVAL"
  done
  # Outside the loop's condition, so that errexit applies to every write.
  # shellcheck disable=SC2086 # two words
  with_route_lock reconcile_locked $answer
}

# --- serve --------------------------------------------------------------------------------------

client_tls() {
  tls_files=""
  if [ -n "${CLIENT_TLS_CERT:-}" ] && [ -n "${CLIENT_TLS_KEY:-}" ]; then
    printf '%s\n' "$CLIENT_TLS_CERT" >"$PGBOUNCER_CONF_DIR/client.crt"
    printf '%s\n' "$CLIENT_TLS_KEY" >"$PGBOUNCER_CONF_DIR/client.key"
    tls_files="client_tls_cert_file = $PGBOUNCER_CONF_DIR/client.crt
client_tls_key_file = $PGBOUNCER_CONF_DIR/client.key"
    [ -n "$CLIENT_TLS_SSLMODE" ] || CLIENT_TLS_SSLMODE=require
  elif [ -n "${CLIENT_TLS_CERT:-}${CLIENT_TLS_KEY:-}" ]; then
    die "client TLS needs both CLIENT_TLS_CERT and CLIENT_TLS_KEY"
  elif [ "$CLIENT_TLS_SSLMODE" = disable ]; then
    log "client TLS is off (CLIENT_TLS_SSLMODE=disable): only for local stacks, never over the internet"
  else
    die "client TLS is required: set CLIENT_TLS_CERT and CLIENT_TLS_KEY (PEM), or CLIENT_TLS_SSLMODE=disable explicitly for a local stack"
  fi
}

# The HBA file: the admin console only over the local socket unless ADMIN_OVER_TCP=1.
hba_rules() {
  case "$ADMIN_OVER_TCP" in
    1)
      log "ADMIN_OVER_TCP=1: the admin console accepts TCP logins (self-hosted file router only)"
      PGB_HBA_ADMIN_TCP="host all $PGBOUNCER_ADMIN_USER 0.0.0.0/0 scram-sha-256
host all $PGBOUNCER_ADMIN_USER ::/0 scram-sha-256"
      ;;
    0)
      PGB_HBA_ADMIN_TCP="host pgbouncer all 0.0.0.0/0 reject
host pgbouncer all ::/0 reject
host all $PGBOUNCER_ADMIN_USER 0.0.0.0/0 reject
host all $PGBOUNCER_ADMIN_USER ::/0 reject"
      ;;
    *) die "ADMIN_OVER_TCP must be 0 or 1" ;;
  esac
  PGB_ADMIN_USER="$PGBOUNCER_ADMIN_USER" PGB_HBA_ADMIN_TCP="$PGB_HBA_ADMIN_TCP" \
    render "$PGBOUNCER_TEMPLATE_DIR/pgbouncer_hba.conf.template" "$PGBOUNCER_CONF_DIR/pgbouncer_hba.conf"
}

# The persisted route, or on first start (no route yet) UPSTREAM_HOST without an epoch.
first_route_locked() {
  if [ -s "$DATABASES_FILE" ] && grep -q "^$PGBOUNCER_DATABASE = host=" "$DATABASES_FILE"; then
    log "persisted upstream: $(grep "^$PGBOUNCER_DATABASE = " "$DATABASES_FILE" | sed 's/ dbname=.*//') (epoch $(held_epoch | grep . || echo none))"
  elif [ -n "${UPSTREAM_HOST:-}" ]; then
    write_target "$UPSTREAM_HOST" "$UPSTREAM_PORT" "$UPSTREAM_DBNAME"
    log "first start: routing $PGBOUNCER_DATABASE to $UPSTREAM_HOST:$UPSTREAM_PORT"
  elif [ -z "$ACTIVE_URLS" ]; then
    die "UPSTREAM_HOST (or ACTIVE_URLS) is required on first start"
  fi
}

serve() {
  # In the image the machine starts us as root: prepare the volume, then run as RUN_AS_USER
  # (PgBouncer refuses to run as root). The local stack already runs us unprivileged.
  if [ "$(id -u)" = 0 ] && [ -n "${RUN_AS_USER:-}" ]; then
    mkdir -p "$PGBOUNCER_CONF_DIR" "$PGBOUNCER_STATE_DIR" "$SOCKET_DIR"
    touch "$ROUTE_LOCK"
    chown -R "$RUN_AS_USER" "$PGBOUNCER_CONF_DIR" "$PGBOUNCER_STATE_DIR" "$SOCKET_DIR"
    exec setpriv --reuid="$RUN_AS_USER" --regid="$RUN_AS_USER" --init-groups -- "$0" serve
  fi
  : "${DATABASE_USER:?DATABASE_USER is required}"
  : "${DATABASE_PASSWORD:?DATABASE_PASSWORD is required}"
  : "${PGBOUNCER_ADMIN_PASSWORD:?PGBOUNCER_ADMIN_PASSWORD is required}"
  check_value DATABASE_USER "$DATABASE_USER"
  check_value PGBOUNCER_ADMIN_USER "$PGBOUNCER_ADMIN_USER"
  mkdir -p "$PGBOUNCER_CONF_DIR" "$PGBOUNCER_STATE_DIR" "$SOCKET_DIR"
  [ -w "$PGBOUNCER_STATE_DIR" ] || die "$PGBOUNCER_STATE_DIR is not writable by $(id -un)"
  rm -f "$SERVING_MARK"

  umask 077
  client_tls
  hba_rules

  with_route_lock first_route_locked
  boot_check

  auth_file="$PGBOUNCER_CONF_DIR/userlist.txt"
  {
    userlist_line "$DATABASE_USER" "$DATABASE_PASSWORD"
    userlist_line "$PGBOUNCER_ADMIN_USER" "$PGBOUNCER_ADMIN_PASSWORD"
  } >"$auth_file.tmp"
  mv -f "$auth_file.tmp" "$auth_file"

  PGB_DATABASES_FILE="$DATABASES_FILE" \
  PGB_LISTEN_ADDR="$LISTEN_ADDR" \
  PGB_LISTEN_PORT="$LISTEN_PORT" \
  PGB_SOCKET_DIR="$SOCKET_DIR" \
  PGB_PID_FILE="$PGBOUNCER_CONF_DIR/pgbouncer.pid" \
  PGB_AUTH_FILE="$auth_file" \
  PGB_HBA_FILE="$PGBOUNCER_CONF_DIR/pgbouncer_hba.conf" \
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

  log "starting PgBouncer on $LISTEN_ADDR:$LISTEN_PORT (client TLS: $CLIENT_TLS_SSLMODE; admin console: database pgbouncer, user $PGBOUNCER_ADMIN_USER, $([ "$ADMIN_OVER_TCP" = 1 ] && echo "socket and TCP" || echo "local socket $SOCKET_DIR only"))"
  exec "$PGBOUNCER_BIN" "$PGBOUNCER_CONF_DIR/pgbouncer.ini"
}

# --- commands of a running machine --------------------------------------------------------------

# The persisted epoch (empty when none).
held_epoch() {
  sed -n 's/^;; epoch=\([0-9]*\)$/\1/p' "$DATABASES_FILE" 2>/dev/null | head -n 1
}

# Whether the persisted route is HOST PORT DBNAME.
route_is() {
  grep -q "^$PGBOUNCER_DATABASE = host=$1 port=$2 dbname=$3\$" "$DATABASES_FILE" 2>/dev/null
}

# An epoch names one primary: never route back to a lower epoch, nor elsewhere at the same one.
check_epoch_order() {
  held=$(held_epoch)
  [ -n "$held" ] || return 0
  if [ -z "${4:-}" ]; then
    # A route without an epoch would erase the one held, and every older epoch would pass later.
    log "refused: the route holds epoch $held; give the new route's epoch"
    exit 3
  fi
  case "$4" in *[!0-9]*) die "epoch must be a number" ;; esac
  if [ "$4" -lt "$held" ]; then
    log "refused: epoch $4 is older than the persisted epoch $held"
    exit 3
  fi
  if [ "$4" -eq "$held" ] && ! route_is "$1" "$2" "$3"; then
    log "refused: epoch $4 already routes $PGBOUNCER_DATABASE elsewhere"
    exit 3
  fi
}

route_locked() {
  check_epoch_order "$@"
  write_target "$@"
  if [ ! -e "$SERVING_MARK" ]; then
    log "routed $PGBOUNCER_DATABASE to $1:$2 (epoch ${4:-none}); PgBouncer is not serving yet and starts on it"
    return 0
  fi
  # PgBouncer may have been exec'd a moment ago and not listen yet: give it a few seconds.
  tries=0
  until admin_psql -c "RELOAD" >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -lt 20 ] || die "routed $PGBOUNCER_DATABASE to $1:$2 (epoch ${4:-none}) but RELOAD failed: PgBouncer is not reachable on $SOCKET_DIR"
    sleep 0.5
  done
  log "routed $PGBOUNCER_DATABASE to $1:$2 (epoch ${4:-none}) and reloaded"
}

route() {
  [ $# -eq 3 ] || [ $# -eq 4 ] || die "usage: entrypoint.sh route HOST PORT DBNAME [EPOCH]"
  with_route_lock route_locked "$@"
}

# Exit 4 (and nothing on stdout) while PgBouncer has not started yet: in its boot check.
require_serving() {
  [ -e "$SERVING_MARK" ] && return 0
  log "PgBouncer is not serving yet (boot check)"
  exit 4
}

# SHOW DATABASES, read by column name (the column set differs between PgBouncer versions).
show() {
  require_serving
  epoch=$(held_epoch)
  boot_checked=0
  [ -z "$ACTIVE_URLS" ] || boot_checked=1
  rows=$(admin_psql -A -F '|' -c "SHOW DATABASES")
  printf '%s\n' "$rows" | awk -F '|' -v db="$PGBOUNCER_DATABASE" \
    -v epoch="${epoch:--}" -v checked="$boot_checked" '
    NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    $col["name"] == db { print $col["host"], $col["port"], $col["database"], $col["paused"], $col["disabled"], epoch, checked; found = 1 }
    END { exit found ? 0 : 1 }' || die "SHOW DATABASES has no row for $PGBOUNCER_DATABASE"
}

pause_db() {
  seconds="${1:-10}"
  case "$seconds" in *[!0-9]*) die "seconds must be a number" ;; esac
  require_serving
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
  # Not serving yet: nothing is paused, and PgBouncer starts unpaused.
  [ -e "$SERVING_MARK" ] || return 0
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
  kill) require_serving; admin_psql -c "KILL $PGBOUNCER_DATABASE" >/dev/null ;;
  *) die "unknown command: $1" ;;
esac
