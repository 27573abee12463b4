#!/usr/bin/env bash
# Build the container image (deploy/Dockerfile) without a registry; run as root.
#
#   1. a Debian 12 base made by mmdebstrap (minbase, no docs/man/locales), cached as a tar;
#   2. a private dockerd (no bridge, no iptables, its own data root under the cache, so build
#      layers are cached between runs), the base `docker import`ed into it;
#   3. BuildKit builds deploy/Dockerfile from a clean copy of the sources, with the host
#      network (the daemon has no bridge) for apt and pip, and the machine's CA bundle as the
#      secret `ca` (pip behind an intercepting proxy; never stored in the image);
#   4. `docker save` to build/image/mirror-agent-VERSION.tar (what `docker load`, `ctr image
#      import` or a registry push takes), only when the image changed; the daemon is stopped.
#
# Idempotent; installs docker.io and mmdebstrap with apt if missing. Environment:
#   MIRROR_AGENT_IMAGE_CACHE  base tar + daemon state (default /var/cache/mirror-agent)
#   MIRROR_AGENT_IMAGE_OUT    output directory (default build/image)
#   MIRROR_AGENT_CA           CA bundle for pip (default /etc/ssl/certs/ca-certificates.crt)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
start=$(date +%s)

if [ "$(id -u)" -ne 0 ]; then
  echo "build-image: needs root (a private dockerd, mmdebstrap)" >&2
  exit 2
fi

missing=()
for p in docker.io mmdebstrap; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "build-image: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's client (20.10), whatever else is on PATH: a newer docker CLI wants buildx for
# BuildKit builds.
DOCKER_CLI=/usr/bin/docker

cache=${MIRROR_AGENT_IMAGE_CACHE:-/var/cache/mirror-agent}
out=${MIRROR_AGENT_IMAGE_OUT:-$repo/build/image}
ca=${MIRROR_AGENT_CA:-/etc/ssl/certs/ca-certificates.crt}
version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
image=mirror-agent:$version
mkdir -p "$cache" "$out"

# One build at a time per cache (one daemon per data root).
exec 9>"$cache/lock"
flock 9

# --- 1. the base ------------------------------------------------------------------------------
# Its name carries a hash of the options, so changing them makes a new base.
suite=bookworm
mmopts=(--variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
        --dpkgopt='path-exclude=/usr/share/locale/*'
        --dpkgopt='path-include=/usr/share/locale/locale.alias'
        --dpkgopt='path-exclude=/usr/share/lintian/*'
        --dpkgopt='path-exclude=/usr/share/bash-completion/*')
optid=$(printf '%s\n' "$suite" "${mmopts[@]}" | sha256sum | cut -c1-12)
base_tar=$cache/$suite-minbase-$optid.tar
if [ ! -s "$base_tar" ]; then
  echo "build-image: mmdebstrap $suite -> $base_tar"
  t0=$(date +%s)
  if ! mmdebstrap --format=tar "${mmopts[@]}" "$suite" "$base_tar.tmp" >"$cache/mmdebstrap.log" 2>&1; then
    tail -n 20 "$cache/mmdebstrap.log" >&2
    exit 1
  fi
  mv "$base_tar.tmp" "$base_tar"
  echo "build-image: base made in $(($(date +%s) - t0)) s"
fi
base_ref=mirror-agent-base:$suite-$optid

# --- 2. a private daemon ----------------------------------------------------------------------
run=$(mktemp -d /tmp/mirror-agent-image.XXXXXX)
sock=$run/docker.sock
stop_daemon() {
  if [ -s "$run/docker.pid" ]; then
    pid=$(cat "$run/docker.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -rf "$run"
}
trap stop_daemon EXIT
dockerd --bridge=none --iptables=false --ip6tables=false --data-root "$cache/docker" \
  --exec-root "$run/exec" -H "unix://$sock" -p "$run/docker.pid" >"$run/dockerd.log" 2>&1 &
docker() { "$DOCKER_CLI" -H "unix://$sock" "$@"; }
for _ in $(seq 1 300); do
  docker version >/dev/null 2>&1 && break
  if ! kill -0 $! 2>/dev/null; then cat "$run/dockerd.log" >&2; exit 1; fi
  sleep 0.1
done
docker version >/dev/null

if ! docker image inspect "$base_ref" >/dev/null 2>&1; then
  docker import "$base_tar" "$base_ref" >/dev/null
fi

# --- 3. build ---------------------------------------------------------------------------------
# A clean copy of exactly what the Dockerfile copies (no caches, build/ or egg-info).
ctx=$run/context
mkdir -p "$ctx"
cp -a agent bpf setup.py pyproject.toml README.md "$ctx"/
find "$ctx" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
secret=()
[ -r "$ca" ] && secret=(--secret "id=ca,src=$ca")
t0=$(date +%s)
DOCKER_BUILDKIT=1 docker build -q --network host "${secret[@]}" --build-arg "BASE=$base_ref" \
  -f deploy/Dockerfile -t "$image" "$ctx" >/dev/null
echo "build-image: built $image in $(($(date +%s) - t0)) s"

# --- 4. save ----------------------------------------------------------------------------------
id=$(docker image inspect -f '{{.Id}}' "$image")
tarball=$out/mirror-agent-$version.tar
if [ ! -s "$tarball" ] || [ "$(cat "$tarball.id" 2>/dev/null)" != "$id" ]; then
  docker save -o "$tarball.tmp" "$image"
  mv "$tarball.tmp" "$tarball"
  echo "$id" >"$tarball.id"
fi
docker image prune -f >/dev/null  # earlier builds' images, now untagged
docker builder prune -f --keep-storage 3gb >/dev/null  # the layer cache stays bounded
docker image ls "$image"
echo "build-image: $tarball ($(du -m "$tarball" | cut -f1) MB), $(($(date +%s) - start)) s in all"
