#!/usr/bin/env bash
# Installs bdlens into ./.venv on a fresh machine. Usage: bash scripts/install.sh [main|test]
#   main: the package (what `bdlens ensemble` needs: the bundled models and analyses, no dynamical core)
#   test: the package, the demo world's dynamical core (dinosaur, JAX) and the test and cross-check libraries
# Why a script and not one pip line: torch-harmonics 0.8.0 must be built against the CPU torch
# already in the environment (--no-build-isolation); an isolated build would pull a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-main}"
case "$extra" in
  main) spec="." ;;
  test) spec=".[test]" ;;
  *) echo "install.sh: unknown target '$extra' (use 'main' or 'test')" >&2; exit 2 ;;
esac
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade "pip>=24" "setuptools>=77" wheel
$py -m pip install -q "torch==2.13.0" "numpy>=2.0,<3"
$py -c "import torch_harmonics" 2>/dev/null || $py -m pip install -q --no-build-isolation "torch-harmonics==0.8.0"
$py -m pip install -q -e "$spec"
echo "bdlens installed in .venv ($extra)"
