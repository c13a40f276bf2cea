#!/usr/bin/env bash
# A private Docker engine for mpack's image tests, on machines where no engine runs and no registry is reachable
# (CI, dev boxes). Nothing here touches a system-wide engine or exports anything: each command prints the
# DOCKER_HOST to use on stdout and its chatter on stderr.
#
#   scripts/docker-engine.sh install     apt-get install docker.io debootstrap (root; skipped when present)
#   scripts/docker-engine.sh start       start the private dockerd (idempotent); prints DOCKER_HOST
#   scripts/docker-engine.sh base-image  make local/debian-py:bookworm (python3 3.11 + venv) from a cached rootfs tar,
#                                        building the tar once with debootstrap from apt's own mirror
#   scripts/docker-engine.sh up          install + start + base-image (what .ci/run and `make engine` use)
#   scripts/docker-engine.sh stop        stop the engine and unmount what it left behind (idempotent)
#   scripts/docker-engine.sh status      print DOCKER_HOST if the engine answers, exit 1 otherwise
#
# Usage: export DOCKER_HOST="$(scripts/docker-engine.sh up)"
#
# Where things live (all git-ignored or outside the tree):
#   $MPACK_ENGINE_HOME (default <repo>/.engine)        data-root (images, layers) and dockerd.log
#   $MPACK_ENGINE_CACHE (default <repo>/.cache/engine) the base image rootfs tar, kept across `make clean`
#   /tmp/mpack-engine-<key>/                             exec-root, socket and pidfile: unix socket paths must stay
#                                                        short (108 bytes), so not under a deep checkout path
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENGINE_HOME="${MPACK_ENGINE_HOME:-$REPO/.engine}"
CACHE="${MPACK_ENGINE_CACHE:-$REPO/.cache/engine}"
KEY="$(printf '%s' "$ENGINE_HOME" | sha256sum | cut -c1-8)"
RUN_DIR="/tmp/mpack-engine-$KEY"
SOCK="$RUN_DIR/docker.sock"
PIDFILE="$RUN_DIR/docker.pid"
EXEC_ROOT="$RUN_DIR/exec"
HOST="unix://$SOCK"
# N.B. the tag is what tests and README use (tests/test_image_build.py BASE_IMAGE); keep them in step.
BASE_IMAGE="${MPACK_BASE_IMAGE:-local/debian-py:bookworm}"
BASE_TAR="$CACHE/debian-py-bookworm.tar"
SUITE=bookworm

log() { printf 'docker-engine: %s\n' "$*" >&2; }

engine_answers() {
    [ -S "$SOCK" ] && DOCKER_HOST="$HOST" docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

cmd_install() {
    if command -v dockerd >/dev/null && command -v debootstrap >/dev/null && command -v docker >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        log "dockerd/debootstrap missing and not root: run 'sudo apt-get install -y docker.io debootstrap'"
        exit 1
    fi
    log "installing docker.io and debootstrap with apt-get"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >&2
}

cmd_start() {
    if engine_answers; then
        echo "$HOST"
        return 0
    fi
    command -v dockerd >/dev/null || { log "dockerd not found: run '$0 install' (root) first"; exit 1; }
    [ "$(id -u)" = 0 ] || { log "dockerd needs root"; exit 1; }
    # A stale pidfile or mount from an engine that died would make dockerd refuse to start.
    cmd_stop >/dev/null 2>&1 || true
    mkdir -p "$ENGINE_HOME/data" "$EXEC_ROOT"
    # --iptables/--bridge off: no NAT or bridge on these machines; containers use the host network.
    setsid dockerd --iptables=false --ip6tables=false --bridge=none \
        --data-root "$ENGINE_HOME/data" --exec-root "$EXEC_ROOT" --pidfile "$PIDFILE" \
        -H "$HOST" >"$ENGINE_HOME/dockerd.log" 2>&1 </dev/null &
    local i
    for i in $(seq 1 60); do
        if engine_answers; then
            log "engine up at $HOST (log: $ENGINE_HOME/dockerd.log)"
            echo "$HOST"
            return 0
        fi
        sleep 0.5
    done
    log "dockerd did not answer within 30 s; last lines of $ENGINE_HOME/dockerd.log:"
    tail -n 20 "$ENGINE_HOME/dockerd.log" >&2 || true
    exit 1
}

cmd_stop() {
    if [ -f "$PIDFILE" ]; then
        local pid
        pid="$(cat "$PIDFILE")"
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            local i
            for i in $(seq 1 40); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.5
            done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" || true
        fi
        rm -f "$PIDFILE"
    fi
    # dockerd leaves its network namespace bind-mounted; a later start (or rm -rf) trips over it.
    if mountpoint -q "$EXEC_ROOT/netns/default" 2>/dev/null; then
        umount "$EXEC_ROOT/netns/default" || umount -l "$EXEC_ROOT/netns/default" || true
    fi
    rm -f "$SOCK"
    log "engine stopped"
}

apt_mirror() {
    # The Debian mirror apt itself uses here (deb822 .sources or one-line .list), so debootstrap reaches what apt
    # reaches; security and -updates suites are skipped.
    local uri f files=()
    # Only files that exist: Debian's awk (mawk) stops at the first file it cannot open.
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] && files+=("$f")
    done
    [ "${#files[@]}" -gt 0 ] || { echo "http://deb.debian.org/debian"; return; }
    uri="$(awk -v suite="$SUITE" '
        /^URIs:/ { u = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite && u != "") { print u; exit } }
        /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/ && $(i+1) == suite) { print $i; exit } }
    ' "${files[@]}" 2>/dev/null | head -n1)"
    echo "${uri:-http://deb.debian.org/debian}"
}

cmd_base_image() {
    cmd_start >/dev/null
    if DOCKER_HOST="$HOST" docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "$HOST"
        return 0
    fi
    if [ ! -s "$BASE_TAR" ]; then
        command -v debootstrap >/dev/null || { log "debootstrap not found: run '$0 install' first"; exit 1; }
        local mirror rootfs
        mirror="$(apt_mirror)"
        rootfs="$(mktemp -d "${TMPDIR:-/tmp}/mpack-rootfs.XXXXXX")"
        log "debootstrap $SUITE (minbase + python3, python3-venv) from $mirror (about a minute, once)"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$SUITE" "$rootfs" "$mirror" >"$ENGINE_HOME/debootstrap.log" 2>&1 || {
            log "debootstrap failed; last lines of $ENGINE_HOME/debootstrap.log:"
            tail -n 20 "$ENGINE_HOME/debootstrap.log" >&2
            rm -rf "$rootfs"
            exit 1
        }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
        mkdir -p "$CACHE"
        # Sorted names and fixed mtimes: the same rootfs gives the same tar (and the same image ID on import).
        tar -C "$rootfs" --sort=name --numeric-owner --mtime='2025-01-01 00:00:00Z' -cf "$BASE_TAR.tmp" .
        mv "$BASE_TAR.tmp" "$BASE_TAR"
        rm -rf "$rootfs"
    fi
    log "importing $BASE_TAR as $BASE_IMAGE"
    DOCKER_HOST="$HOST" docker import --message "debootstrap $SUITE minbase + python3" "$BASE_TAR" "$BASE_IMAGE" >&2
    echo "$HOST"
}

cmd_status() {
    if engine_answers; then
        echo "$HOST"
    else
        log "no engine answers at $HOST"
        exit 1
    fi
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    base-image) cmd_base_image ;;
    up) cmd_install; cmd_start >/dev/null; cmd_base_image ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|start|base-image|up|stop|status" >&2; exit 2 ;;
esac
