"""One process of a multi-process data-parallel training step (``tests/test_multiprocess.py``).

``python tests/multiprocess_worker.py --coordinator HOST:PORT --num-processes N
--process-id I --local-devices D --out FILE.npz``: joins the run (``jax.distributed``, gloo
CPU collectives), splits the fixed global batch (the shipped sample's first ``--batch``
training rows) over all N*D devices, each process handing JAX only its own rows, runs the
trainer's step once and writes the updated parameters, the loss and the rows this process
held to ``--out`` (every process writes its own file: the parameters are replicated, so
each must hold the same values).
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--local-devices", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--impl", default="jnp")
    p.add_argument("--timeout", type=int, default=60, help="seconds for the processes to find each other")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    # Before jax is imported: the host platform's device count is read once, at backend start.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.local_devices}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    from fusedvjp.model import data, distributed, mlp

    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           initialization_timeout=args.timeout, heartbeat_timeout_seconds=args.timeout,
                           shutdown_timeout_seconds=args.timeout)
    assert jax.process_count() == args.num_processes, jax.process_count()
    assert jax.local_device_count() == args.local_devices, jax.local_devices()

    ds = data.load_sample()
    images, labels = ds.train_images[:args.batch], ds.train_labels[:args.batch]
    params = mlp.init_params(jax.random.key(0), (images.shape[1], args.hidden, 10))

    mesh = distributed.data_mesh()
    distributed.check_batch_size(args.batch, mesh.size)
    params = distributed.replicate(mesh, params)
    x, y = distributed.shard_batch(mesh, images, labels)
    params, loss = mlp.sgd_step(params, x, y, args.lr, args.impl)
    rows = distributed.process_rows(mesh, args.batch)
    # Replicated results: every process reads the full value from its own devices.
    assert loss.sharding.is_fully_replicated and all(v.sharding.is_fully_replicated for v in params.values())
    host = jax.device_get(params)
    np.savez(args.out, loss=np.asarray(jax.device_get(loss)), rows=np.array([rows.start, rows.stop]),
             global_devices=np.array(jax.device_count()), x_local_shape=np.array(x.addressable_shards[0].data.shape),
             **host)
    print(f"process {jax.process_index()}/{jax.process_count()}: rows {rows.start}:{rows.stop} of {args.batch}, "
          f"{jax.device_count()} devices, loss {float(loss):.6f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
