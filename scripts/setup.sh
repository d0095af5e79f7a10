#!/usr/bin/env bash
# Set up klpforge on a fresh Debian machine (Python 3.11, pip, gcc, binutils):
#   Debian packages from scripts/apt-packages.txt, the Python package with its test tools, and with
#   --kernel the cached 6.1 test kernel that `klpforge verify` and the end-to-end tests boot; with --distro the
#   Debian 6.1.0-56-amd64 and 6.12.117+deb13-amd64 packages and prepared trees of the distro tests (they also
#   prepare them on demand).
set -euo pipefail
cd "$(dirname "$0")/.."
want_kernel=0
want_distro=0
want_clang=0
for a in "$@"; do
  [[ $a == --kernel ]] && want_kernel=1
  [[ $a == --distro ]] && want_distro=1
  [[ $a == --clang ]] && want_clang=1
done

pkgs=$(grep -v '^\s*#' scripts/apt-packages.txt | tr '\n' ' ')
missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [[ -n $missing ]]; then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
fi
log=$(mktemp)
if ! python3 -m pip install -q -e '.[test]' >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; echo "setup: pip install failed" >&2; exit 1
fi
rm -f "$log"
# an editable install writes no byte-code (nor does Python where PYTHONDONTWRITEBYTECODE=1): compile it once,
# so that each `klpforge diff` process (one per object) does not (klpforge/util/bytecode.py covers the rest)
python3 -m compileall -q klpforge >/dev/null || true
# under pyenv the `klpforge` command is a shim that exists only after a rehash
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
if [[ $want_kernel -eq 1 ]]; then
  python3 -m klpforge kernel prepare
  # the same kernel with CONFIG_X86_KERNEL_IBT=y (objtool on the linked module): tests/test_kernel_ibt.py
  python3 -m klpforge kernel prepare --variant ibt
fi
if [[ $want_clang -eq 1 ]]; then
  # the 7.3 kernel built with Clang 19 + distributed ThinLTO + kCFI in a Debian 13 build root (issue 18,
  # tests/test_kernel_clang.py, run with KLPFORGE_CLANG=1): cold, ~140 s root + 167 MB source + ~2300 s of CPU,
  # ~20 min on 2 idle cores (docs/clang.md). Not part of --kernel: a cold CI run must stay under an hour.
  python3 -m klpforge kernel prepare --toolchain clang --lto thin --cfi -j2
fi
if [[ $want_distro -eq 1 ]]; then
  python3 -c 'from klpforge.distro import debian; print(debian.prepare_tree("6.1.0-56-amd64", progress=print))'
  # Debian 13: also makes the trixie build root (gcc-14) once
  python3 -c 'from klpforge.distro import debian; print(debian.prepare_tree("6.12.117+deb13-amd64", progress=print))'
fi
