#!/usr/bin/env bash
# Installs the peer libraries that the benchmarks compare against, each only if it installs beside
# the pinned torch (a constraints file forbids replacing it). Failures are reported, not fatal:
# a benchmark whose peer is missing says so and compares against its in-run baseline only.
set -u
PY=${1:-.venv/bin/python}
cons=$(mktemp)
$PY -c "import torch; print(f'torch=={torch.__version__.split(\"+\")[0]}')" > "$cons"
for pkg in curvlinops-for-pytorch laplace-torch captum dattri hessian-eigenthings pyhessian torch-cka tqdm; do
  if $PY -m pip install --quiet -c "$cons" "$pkg"; then echo "bench peer installed: $pkg"; else echo "bench peer NOT installed: $pkg"; fi
done
# kronfluence asks for torchvision (which drags in another torch): install it without dependencies
# and add its runtime needs by hand.
if $PY -m pip install --quiet --no-deps kronfluence && $PY -m pip install --quiet -c "$cons" accelerate einops opt_einsum safetensors tqdm; then
  echo "bench peer installed: kronfluence (no deps)"
else
  echo "bench peer NOT installed: kronfluence"
fi
# Some peers pull a torchvision wheel built for another torch; it fails at import and takes
# laplace-torch down with it. None of the benchmarks needs it.
if ! $PY -c "import torchvision" >/dev/null 2>&1; then $PY -m pip uninstall --quiet -y torchvision >/dev/null 2>&1 || true; fi
rm -f "$cons"
