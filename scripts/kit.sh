#!/usr/bin/env bash
# One entry point for the course kit: set up (idempotently), then run the demo or the tests.
#
#   bash scripts/kit.sh demo [demo args...]   set up, then plant and measure a backdoor (offline)
#   bash scripts/kit.sh test [pytest args...] set up (with the website's extra, site), then run the whole test suite
#   bash scripts/kit.sh setup                 set up only
#
# Setup = a virtual environment in .venv with torch + the matching torchvision from PyPI
# and the kit installed in editable mode, plus, when apt is available, Debian's
# dataset-fashion-mnist (the offline default dataset), bubblewrap (the sandbox the
# homework's autograder runs student code in) and cgroup-tools (each sandbox's own control
# group: memory, processes, CPU). Re-running it skips whatever is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

have_root() { [ "$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {  # apt_install PACKAGE [TEST-PATH]: install a Debian package unless already there
  local pkg=$1 probe=${2:-}
  if [ -n "$probe" ] && [ -e "$probe" ]; then return 0; fi
  if command -v apt-get >/dev/null 2>&1 && have_root; then
    as_root apt-get install -y -q "$pkg" >/dev/null 2>&1 || {
      as_root apt-get update -q >/dev/null 2>&1 && as_root apt-get install -y -q "$pkg" >/dev/null 2>&1; } \
      || echo "kit: could not apt-get install $pkg (continuing)" >&2
  else
    echo "kit: apt-get not available: skipping $pkg" >&2
  fi
}

setup() {  # setup [EXTRAS]: the extras of pyproject.toml to install (default test; the test command adds site)
  local extras=${1:-test}
  apt_install dataset-fashion-mnist /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
  apt_install bubblewrap /usr/bin/bwrap
  apt_install cgroup-tools /usr/bin/cgcreate
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    "$PY" -m venv --clear "$VENV"   # new, or left half-made by an interrupted setup
  fi
  local stamp="$VENV/.kit-installed" want have
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  have=$(cat "$stamp" 2>/dev/null || true)
  if [ "$have" != "$want $extras" ] && [ "$have" != "$want test,site" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[$extras]"
    echo "$want $extras" > "$stamp"
  fi
}

cmd=${1:-demo}; shift || true
case "$cmd" in
  setup) setup ;;
  demo)  setup; exec "$VENV/bin/python" -m course_lib demo "$@" ;;
  test)
    setup test,site   # the site extra: tests/test_site.py builds the course website
    apt_install chromium /usr/bin/chromium   # for the JupyterLab browser test
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash scripts/kit.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
