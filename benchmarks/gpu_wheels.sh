#!/usr/bin/env bash
# Packs into .whl/ (git-ignored) what bdlens imports beyond a GPU machine's image (Python 3.12, x86-64,
# a CUDA torch; see docs/gpu.md): wheels of the versions installed here, and torch-harmonics' pure-Python
# package (it ships no wheel; bdlens needs none of its compiled helpers). Run it where pip reaches PyPI,
# then carry .whl to the GPU machine; benchmarks/gpu_check.sh installs it into a scratch directory.
#     bash benchmarks/gpu_wheels.sh            (PYTHON: the environment to copy versions from, default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
names="pydantic pydantic_core annotated_types typing_inspection typing_extensions pyro-ppl pyro-api zarr numcodecs donfig google-crc32c dask partd locket xarray"
pins=$("$py" -c "import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $names)
rm -rf .whl && mkdir -p .whl/site
exclude="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
# shellcheck disable=SC2086  # one argument per pin
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
cp -r "$("$py" -c 'import os, torch_harmonics; print(os.path.dirname(torch_harmonics.__file__))')" .whl/site/
find .whl/site -name __pycache__ -prune -exec rm -rf {} +
du -sh .whl
