#!/usr/bin/env bash
# Installs everything this project needs on a Debian machine, by package name:
# Debian packages with apt-get, Python packages into .venv with pip, then the
# generated protobuf code. Idempotent: a second run only checks and returns.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
cd "$repo"

say() { printf '[install] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "install: run as root (apt-get installs packages, and the emulated mesh needs network namespaces)" >&2
    exit 1
fi

debian_packages=(
    iproute2          # ip netns, veth, tc
    nftables          # forwarding policy, emulated loss
    wireguard-tools   # wg
    wireguard-go      # userspace WireGuard where the kernel has no module
    iperf3            # traffic in the emulated mesh
    procps            # ps, pkill
    python3-venv
    gcc
    make
    libnftables-dev   # the dataplane shim links libnftables
    linux-libc-dev    # the kernel's headers: the eBPF counters (linux/bpf.h, rtnetlink)
    pkg-config
    babeld            # interop tests: a stock Babel speaker beside ours
    tshark            # interop tests: decode what we send (non-root capture stays off)
    curl              # exit tests: downloads from the emulated internet
)
missing=()
for pkg in "${debian_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# anvil (the emulated mesh's chain) comes from npm. Any node with npm will do:
# Debian's own only when there is none (a nodesource node bundles its npm).
if ! command -v npm >/dev/null; then
    say "apt-get install nodejs npm"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    python3 -m venv "$venv"
fi

# Reinstall Python packages only when the dependency list changed.
stamp="$venv/.install-stamp"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "pip install -e .[test]"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -e ".[test]"
    echo "$want" > "$stamp"
fi
make -C "$repo/dataplane" -s

# The pinned anvil, into deploy/chain/node_modules (its binary is called directly).
anvil="$repo/deploy/chain/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
if [ ! -x "$anvil" ] || [ deploy/chain/package-lock.json -nt "$anvil" ]; then
    say "npm ci (anvil)"
    npm ci --prefix "$repo/deploy/chain" --no-audit --no-fund --loglevel=error
    touch "$anvil"
fi

say "generating protobuf code"
"$venv/bin/python" -m proto.build

say "ready: $venv/bin/meshctl"
