#!/bin/bash
# Install what devdax-lab needs and is missing, and nothing else:
# Debian packages (from bookworm only), a virtual environment in .venv with
# the project installed from pyproject.toml. Idempotent: a second run checks,
# finds everything present and does no network work.
set -euo pipefail
cd "$(dirname "$0")/.."

# cpio: the unit tests read the lab's own cpio writer back with it; xz-utils:
# tar unpacks linux-source's .tar.xz with it (dpkg-deb reads .deb members itself).
DEB_PACKAGES=(qemu-system-x86 busybox-static ndctl daxctl cpio gcc libc6-dev
              xz-utils util-linux ccache chromium python3-venv linux-source-6.12 make patch git bc flex bison libelf-dev libssl-dev)

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

# Inside an activated conda environment (environment.yml) the Python
# dependencies are conda's: install only the project, without dependencies,
# into that environment, and build no .venv. Same rule as the Makefile.
if [ -n "${CONDA_PREFIX:-}" ] && [ -n "${CONDA_DEFAULT_ENV:-}" ] && [ "$CONDA_DEFAULT_ENV" != "base" ]; then
    stamp="$CONDA_PREFIX/.devdax-lab-installed-$(sha256sum pyproject.toml | cut -c1-16)"
    if [ ! -e "$stamp" ]; then
        echo "setup: installing devdax-lab into the conda environment $CONDA_PREFIX (no deps)"
        "$CONDA_PREFIX/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
        if ! "$CONDA_PREFIX/bin/python" -m pip check -q >/dev/null 2>&1; then
            "$CONDA_PREFIX/bin/python" -m pip check || true
            echo "setup: a dependency is missing or too old: conda env update -f environment.yml" >&2
            exit 2
        fi
        rm -f "$CONDA_PREFIX"/.devdax-lab-installed-*
        touch "$stamp"
    else
        echo "setup: devdax-lab installed in the conda environment $CONDA_PREFIX"
    fi
    exit 0
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
