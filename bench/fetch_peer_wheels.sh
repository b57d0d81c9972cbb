#!/usr/bin/env bash
# Downloads the peer libraries the benchmark compares against, as wheels, into .device-wheels/
# (git-ignored), for the GPU machine, which has no package index: name .device-wheels in the
# device call's `carry`, and bench/device_check.sh installs them (pip --no-deps --no-index).
#
#     bash bench/fetch_peer_wheels.sh            # PYTHON (python3), DEST (.device-wheels)
#
# The GPU image already has torch 2.11, triton 3.6, jax 0.11.2, flax, optax, jaxtyping,
# absl-py, tqdm, numpy, protobuf, packaging, msgpack, rich, pyyaml and treescope. What the
# peers need beyond that (from each wheel's METADATA, `unzip -p X.whl '*/METADATA' | grep
# ^Requires-Dist`), pinned so the set is the one that was checked:
#   tokamax 0.0.17        -> einshape, pydantic (-> pydantic-core, annotated-types,
#                            typing-inspection, typing-extensions>=4.16), qwix, immutabledict,
#                            tensorboardx; and xprof, which is NOT fetched: 32 MB plus duckdb and
#                            google-cloud-storage, imported by tokamax only for its own
#                            benchmarking -- fusedvjp.bench.peers stubs it when it is missing.
#   liger-kernel 0.8.5     -> torch, triton (in the image)
#   cut-cross-entropy 25.1.1 -> torch, triton (in the image)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${DEST:-.device-wheels}
PEERS=(tokamax==0.0.17 liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
DEPS=(einshape==1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
      typing-extensions==4.16.0 qwix==0.1.8 immutabledict==4.3.1 tensorboardx==2.6.5)
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  -d "$DEST" "${PEERS[@]}" "${DEPS[@]}"
ls -l "$DEST"
du -sh "$DEST"
