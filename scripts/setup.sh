#!/usr/bin/env bash
# Idempotent machine + venv set-up for mirror-agent (Debian 12, run as root).
# Fast when already done: every step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd: `systemd-analyze verify` checks deploy/mirror-agent.service in the tests.
# tcpreplay: pushes captures of tunnels the kernel here cannot make into a veth
# (tests/integration/test_decap_live.py).
APT_PKGS=(python3-venv python3-bpfcc libbpfcc linux-headers-amd64 iproute2 libpcap0.8 gcc
          libc6-dev tcpdump tshark nginx-light curl iperf3 wrk tcpflow systemd prometheus
          tcpreplay nats-server)

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages (${missing[*]}); run 'make setup' as root" >&2
    exit 2
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Packages with a daemon (prometheus, nginx, nats-server) must not start one: tests start their own.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles bpf/ at start-up against kernel headers. Kernels here ship none, and the
# program only uses UAPI headers, so Debian's generic headers serve when linked in place.
if [ "$(id -u)" -eq 0 ]; then
  mod="/lib/modules/$(uname -r)"
  if [ ! -e "$mod/build/include/uapi/linux/bpf.h" ] && [ ! -e "$mod/build/include/generated" ]; then
    amd64=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$amd64" ] && [ -n "$common" ]; then
      mkdir -p "$mod"
      ln -sfn "$amd64" "$mod/build"
      ln -sfn "$common" "$mod/source"
      echo "setup: linked $mod/build -> $amd64"
    fi
  fi
fi

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
# The install compiles the native ring decoder (setup.py), so its sources are in the stamp too:
# a changed decoder is rebuilt by the next `make setup`.
stamp=.venv/.installed-$(cat pyproject.toml setup.py agent/sources/ring/ring_*.[ch] bpf/mirror_event.h \
  | sha1sum | cut -c1-12)
if [ ! -e "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# The lab (lab/: namespaces, servers, clients for the demo, tests and benchmarks) is not part of
# the shipped package; this checkout's root on the venv's path makes it importable here.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -e "$site/mirror-agent-lab.pth" ] || echo "$PWD" > "$site/mirror-agent-lab.pth"

# The native ring decoder must have been built by the install above (it needs gcc).
.venv/bin/python -m agent.sources.ring.native >/dev/null
