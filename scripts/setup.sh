#!/usr/bin/env bash
# Installs what tele needs on a fresh Debian/Ubuntu machine: system packages (only the missing
# ones) and a virtualenv in .venv with tele and its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# sshfs (+ fuse3) mounts an engaged pod's volumes (the agent serves them with tele.agent.sftp,
# not OpenSSH's sftp-server, which nothing needs any more). dbus-daemon and util-linux
# (nsenter, unshare) serve the systemd-resolved test.
# docker-registry (CNCF Distribution) is the sandbox's image registry; busybox-static makes the
# tests' tiny image; mmdebstrap unpacks the Debian base of tele's image; skopeo and umoci read
# its archives in tests.
# runc runs the sandbox's containers (crun refuses a hybrid cgroup layout).
# tcsh reads back the env files written for csh (--env-syntax csh).
# docker.io (dockerd, containerd, the docker CLI): Docker mode's tests start a private dockerd
# (own socket and data root, no bridge, no iptables); without systemd nothing else starts it.
# gcc and python3-dev compile tele.net's hottest modules with mypyc (scripts/build_native.py).
APT_PACKAGES=(iproute2 nftables iperf3 socat procps curl sshfs sshuttle
    dbus-daemon util-linux docker-registry busybox-static mmdebstrap skopeo runc umoci tcsh
    docker.io gcc python3-dev)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing system packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# systemd-resolved for tests/vif/test_resolved.py, unpacked into .cache, never installed:
# installing the package would make this machine's /etc/resolv.conf its stub. The test runs it
# in namespaces of its own. Best effort: without it that test is skipped, saying why.
if [ ! -x .cache/systemd-resolved/lib/systemd/systemd-resolved ] &&
    [ ! -x /lib/systemd/systemd-resolved ] && command -v apt-get >/dev/null &&
    command -v dpkg-deb >/dev/null; then
    echo "setup: unpacking systemd-resolved into .cache (for a test; not installed)"
    tmp=$(mktemp -d)
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    if (cd "$tmp" && { apt-get download -qq systemd-resolved >/dev/null 2>&1 ||
        { $SUDO apt-get update -qq && apt-get download -qq systemd-resolved >/dev/null 2>&1; }; }); then
        rm -rf .cache/systemd-resolved
        mkdir -p .cache
        dpkg-deb -x "$tmp"/systemd-resolved_*.deb .cache/systemd-resolved
    else
        echo "setup: could not download systemd-resolved; tests/vif/test_resolved.py will skip"
    fi
    rm -rf "$tmp"
fi

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            PYTHON="$candidate"
            break
        fi
    done
fi
[ -n "$PYTHON" ] || { echo "setup: tele needs Python 3.11 or newer" >&2; exit 1; }

stamp=.venv/.tele-installed
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: creating .venv with $PYTHON"
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test,native]'
    touch "$stamp"
fi

# mypyc builds of tele.net's packet codecs and userspace TCP (scripts/build_native.py), when
# missing or built from other sources. Best effort: without them the same modules run as Python.
if ! env -u TELE_NATIVE .venv/bin/python -c 'import sys, tele.net; sys.exit(not tele.net.NATIVE)' \
    2>/dev/null; then
    echo "setup: compiling tele.net's packet and TCP modules with mypyc (about 15 s)"
    .venv/bin/python scripts/build_native.py ||
        echo "setup: the native build failed; tele runs those modules as Python"
fi
