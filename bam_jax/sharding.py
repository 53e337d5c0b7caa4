"""The one place that builds the mesh and says how arrays lie on it (jax only).

One ('data', 'fsdp') mesh. The batch is split over both axes ('fsdp' shards parameters *and*
data, as in MaxText); parameters are replicated, or with `config.mesh.fsdp > 1` each large leaf
is sharded over 'fsdp' along its largest divisible dimension (ZeRO-3 style: XLA all-gathers it
where a matmul needs it).
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

_LOG = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The mesh of `config.mesh`: `fsdp` devices share each parameter; `num_devices` > 0 uses
    only the first that many devices (single-process runs). `devices` defaults to this
    process's; a described TPU topology's devices give the mesh an ahead-of-time compile
    targets (`bam_jax.tools.aot`)."""
    devices = jax.devices() if devices is None else list(devices)
    if config.mesh.num_devices > 0:
        if config.mesh.num_devices > len(devices) or jax.process_count() > 1:
            raise ValueError(f"config.mesh.num_devices={config.mesh.num_devices} needs a single "
                             f"process with at least that many devices (have {len(devices)}); "
                             f"set --config.mesh.num_devices=0 to use all")
        devices = devices[:config.mesh.num_devices]
    fsdp = config.mesh.fsdp
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} must divide the {len(devices)} devices; "
                         f"set --config.mesh.fsdp to a divisor of {len(devices)}")
    return jax.make_mesh((len(devices) // fsdp, fsdp), BATCH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(BATCH_AXES))


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
    """Leading (batch) dimension split over every mesh axis."""
    return jax.NamedSharding(mesh, jax.P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
    return jax.NamedSharding(mesh, jax.P())


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, fsdp_min_size: int) -> Any:
    """A sharding per leaf: replicated below `fsdp_min_size` elements or without an fsdp axis;
    otherwise the largest dimension that 'fsdp' divides is split. A large leaf with no such
    dimension stays replicated and is logged, as big_vision does, since it costs memory on
    every device."""
    fsdp = mesh.shape["fsdp"]

    def leaf_sharding(path, leaf):
        spec = [None] * leaf.ndim
        if fsdp > 1 and leaf.size >= fsdp_min_size:
            for dim in np.argsort(leaf.shape)[::-1]:
                if leaf.shape[dim] % fsdp == 0:
                    spec[dim] = "fsdp"
                    break
            else:
                _LOG.warning("%s %s stays replicated: no dimension divides by fsdp=%d",
                             jax.tree_util.keystr(path), tuple(leaf.shape), fsdp)
        return jax.NamedSharding(mesh, jax.P(*spec))

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def data_devices(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def per_process_batch(global_batch_size: int, process_count: int | None = None) -> int:
    """The share of a global batch that each process reads; raises if it does not split evenly."""
    processes = jax.process_count() if process_count is None else process_count
    if global_batch_size <= 0 or global_batch_size % processes:
        raise ValueError(f"batch size {global_batch_size} does not divide by the {processes} "
                         f"processes; set the batch size to a positive multiple of {processes}")
    return global_batch_size // processes


def check_global_batch(global_batch_size: int, mesh: jax.sharding.Mesh,
                       process_count: int | None = None) -> None:
    """Raises if the global batch does not split over the processes and the mesh's devices."""
    per_process_batch(global_batch_size, process_count)
    devices = data_devices(mesh)
    if global_batch_size % devices:
        raise ValueError(
            f"batch size {global_batch_size} does not divide by the {devices} devices on mesh axes "
            f"{BATCH_AXES}; set the batch size to a multiple of {devices}")


def device_iterator(batches, mesh: jax.sharding.Mesh, prefetch: int = 2
                    ) -> Iterator[dict[str, jax.Array]]:
    """Global jax arrays from per-process numpy batches (a tf.data dataset or any iterable),
    the batch dimension sharded over the mesh.

    Transfers run `prefetch` batches ahead (device_put is asynchronous), so the host->device copy
    of the next batches overlaps the current step.
    """
    sharding = batch_sharding(mesh)
    batches = batches.as_numpy_iterator() if hasattr(batches, "as_numpy_iterator") else iter(batches)
    checked = False

    def put(batch):
        nonlocal checked
        if not checked:
            local = len(next(iter(jax.tree.leaves(batch))))
            check_global_batch(local * jax.process_count(), mesh)
            checked = True
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

    queue = collections.deque()
    for batch in batches:
        queue.append(put(batch))
        if len(queue) > prefetch:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
