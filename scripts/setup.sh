#!/bin/bash
# Install what devdax-lab needs and is missing, and nothing else:
# Debian packages (from bookworm only), a virtual environment in .venv with
# the project installed from pyproject.toml. Idempotent: a second run checks,
# finds everything present and does no network work.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(qemu-system-x86 busybox-static ndctl daxctl cpio gcc libc6-dev
              zstd xz-utils util-linux ccache chromium python3-venv linux-source-6.12 make patch git bc flex bison libelf-dev libssl-dev)

missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q \
        -o APT::Default-Release=bookworm --no-install-recommends "${missing[@]}"
else
    echo "setup: Debian packages present"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    echo "setup: installing Python dependencies from pyproject.toml"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test,dev]'
    rm -f .venv/.installed-*
    touch "$stamp"
else
    echo "setup: Python dependencies present"
fi
