#!/usr/bin/env bash
# Installs the system packages netmesh needs, on Debian/Ubuntu, when missing.
# Runs as root (or says what to install when not root).
set -euo pipefail

# A command may live in sbin, which a non-login PATH can lack.
have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
installed() { dpkg-query -W -f '${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

need=()
have wireguard-go || need+=(wireguard-go)
have wg || need+=(wireguard-tools)
have ip || need+=(iproute2)
have nft || need+=(nftables)
have ping || need+=(iputils-ping)
have nsenter || need+=(util-linux)
have make || need+=(make)
# The DNS tests ask the agents' servers with dig; getent (libc-bin) is always there.
have dig || need+=(dnsutils)
# The broker's private CA and certificate (TLS beyond loopback) are made with openssl.
have openssl || need+=(openssl)
# `make bench` measures throughput through a relay and direct with iperf3 (bench/relay.py).
have iperf3 || need+=(iperf3)
# Debian's python3 needs python3-venv for `python3 -m venv`.
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
# Optional: the kernel-backend test boots a real Debian kernel (it ships
# wireguard.ko) under qemu with virtme-ng (tests/test_kernel_vm.py, skipped
# without them), which needs a static busybox.
vm=()
have qemu-system-x86_64 || vm+=(qemu-system-x86)
installed busybox-static || vm+=(busybox-static)
compgen -G '/lib/modules/*/kernel/drivers/net/wireguard/wireguard.ko*' >/dev/null \
    && compgen -G '/boot/vmlinuz-*' >/dev/null || vm+=(linux-image-amd64)
# Optional: the dashboard's test drives a real headless browser (tests/test_dashboard.py,
# skipped without it).
browser=()
have chromium || browser+=(chromium)
# Optional: the systemd-resolved test runs resolved (extracted by
# scripts/extract-resolved.sh, never installed) on a bus of its own.
have dbus-daemon || browser+=(dbus-daemon)

if [ ${#need[@]} -eq 0 ] && [ ${#vm[@]} -eq 0 ] && [ ${#browser[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    if [ ${#vm[@]} -ne 0 ]; then
        echo "the kernel-backend VM test needs: ${vm[*]} (it is skipped without them)" >&2
    fi
    if [ ${#browser[@]} -ne 0 ]; then
        echo "the dashboard's and systemd-resolved tests need: ${browser[*]} (skipped without)" >&2
    fi
    if [ ${#need[@]} -ne 0 ]; then
        echo "netmesh needs these system packages: ${need[*]} (install them as root)" >&2
        exit 1
    fi
    exit 0
fi
echo "installing system packages: ${need[*]} ${vm[*]} ${browser[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" "${vm[@]}" "${browser[@]}" >/dev/null
