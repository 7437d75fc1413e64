#!/bin/sh
# Install the Debian packages the test suite needs; do nothing when they are
# already there (idempotent, no apt-get update unless something is missing).
#   protobuf-compiler, libprotobuf-java, a JDK: the Java peer compiled from proto/
#   libprotobuf-dev, g++, pkg-config: docs/protocol.md's C++ reader, compiled by tests/test_cpp_reader.py
#   bubblewrap, podman, runc, catatonit: container runtimes for the launchers
#   docker.io: Docker's engine and Debian's client; the tests start a private daemon
#              (tests/dockerd.py), never the system service
#   debootstrap: the mini-condor's Debian 13 node root
#   postgresql: the PostgreSQL store's tests (a private cluster per test run)
#   npm: installs buf (@bufbuild/buf) for the schema gate (scripts/schema-gate.sh)
#   chromium: a headless browser that loads the broker's web monitor (tests/test_broker_monitor.py)
#   systemd: systemd-analyze verify checks contrib/'s service units (tests/test_config.py)
#   haproxy: the broker fleet behind one address (tests/haproxy.py, tests/test_fleet.py); the tests
#            run a private one, never the system service
#   xrootd-server: the XRootD sandbox store (tests/xrootd.py runs a private server; Debian's package
#            starts no service)
# Usage: install-system-deps.sh [PACKAGE...]   (default: all of the above)
set -eu

packages="protobuf-compiler libprotobuf-java libprotobuf-dev g++ pkg-config bubblewrap podman runc debootstrap catatonit postgresql docker.io chromium"
packages="$packages systemd haproxy xrootd-server"
# Callers may name the packages they need instead (make demo: only debootstrap).
[ "$#" -gt 0 ] && packages="$*"
# A JDK and npm are asked for only when their commands are missing: machines often have them from
# elsewhere (NodeSource's nodejs ships npm and conflicts with Debian's npm package).
[ "$#" -gt 0 ] || command -v javac >/dev/null 2>&1 || packages="$packages default-jdk-headless"
[ "$#" -gt 0 ] || command -v npm >/dev/null 2>&1 || packages="$packages npm"

missing=""
for pkg in $packages; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    case "$status" in
        *"install ok installed"*) ;;
        *) missing="$missing $pkg" ;;
    esac
done

if [ -z "$missing" ]; then
    echo "system packages: all present ($packages)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: missing Debian packages:$missing" >&2
    echo "fix: run as root, or: sudo apt-get install -y --no-install-recommends$missing" >&2
    exit 1
fi
echo "system packages: installing$missing"
export DEBIAN_FRONTEND=noninteractive
# Installing docker.io would start Docker's system service: a docker0 bridge and iptables rules on
# this host (haproxy: its system service). Forbid service starts while installing them (the tests
# start private daemons of their own), unless the machine already has a policy.
policy=/usr/sbin/policy-rc.d
own_policy=""
case " $missing " in *" docker.io "*|*" haproxy "*) docker_missing=1 ;; *) docker_missing="" ;; esac
if [ -n "$docker_missing" ] && [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# splitpilot install-system-deps: no service starts while installing\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    own_policy=1
    trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
[ -z "$own_policy" ] || { rm -f "$policy"; trap - EXIT; }
echo "system packages: installed$missing"
