#!/usr/bin/env bash
# Builds target/release/armorm-mkl: armorm with candle's `mkl` feature, fed by Intel MKL from PyPI.
# The default build (target/release/armorm) is left as it is. MKL is under the Intel Simplified Software
# License and intel-openmp under Intel's EULA: a binary built this way embeds both; do not redistribute it
# without reading them.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/mkl-venv
root=target/mkl-root
if [ ! -x "$venv/bin/pip" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q mkl-static==2026.2.0 mkl-include==2026.2.0 intel-openmp==2026.2.0
fi
# intel-mkl-src finds MKL through $MKLROOT: a folder with only the static libraries (beside a libiomp5.so
# the linker would take the shared one) and the headers.
mkdir -p "$root/lib"
for lib in libmkl_intel_lp64.a libmkl_intel_thread.a libmkl_core.a libmkl_sequential.a libiomp5.a; do
  ln -sf "$(realpath "$venv/lib/$lib")" "$root/lib/$lib"
done
# Real folders of links: intel-mkl-tool's directory walk does not descend into a linked folder.
mkdir -p "$root/include"
for h in "$venv"/include/*.h; do
  ln -sf "$(realpath "$h")" "$root/include/$(basename "$h")"
done

# intel-mkl-src's build script prints nothing when it finds no MKL, and cargo then keeps that empty
# result; make it look again.
for out in target/release/build/intel-mkl-src-*/output; do
  if [ -f "$out" ] && ! grep -q rustc-link-lib "$out"; then
    rm -rf "$(dirname "$out")"
  fi
done
MKLROOT="$(realpath "$root")" cargo build --release --features mkl
cp target/release/armorm target/release/armorm-mkl
# Put the default binary back (its artifacts are cached: this only relinks).
cargo build --release
echo "built target/release/armorm-mkl"
