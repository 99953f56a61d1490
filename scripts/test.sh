#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine (as root), then run it:
# lint, unit tests, and the integration tests that build network namespaces.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
if command -v apt-get >/dev/null; then
  apt-get update -qq
  # chromium: the real browser of tests/integration/test_browser.py (its hard dependencies
  # bring a font, fonts-dejavu-core; the recommended chromium-sandbox is not used as root).
  # iputils-ping, traceroute, mtr-tiny: the TUN client's tests; openvpn: a peer in bench/tun.py.
  # systemd: systemd-socket-activate and systemd-analyze for the socket-activation and unit
  # file tests (nothing is started; the tests use a fake NOTIFY_SOCKET).
  apt-get install -y -qq --no-install-recommends \
    curl iproute2 nftables socat iperf3 procps ca-certificates dnsmasq-base dnsutils \
    openssh-server openssh-client chromium haproxy nginx bpftool iputils-ping traceroute \
    mtr-tiny openvpn systemd >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'

ruff check src tests bench examples
ruff format --check src tests bench examples
python3 -m pytest "$@"
