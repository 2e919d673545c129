"""Array placement helpers for one mesh that spans every device of every process."""

from __future__ import annotations


def replicated_host_array(mesh, value):
    """Return host data as an array replicated on every device of `mesh`, across all processes."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, PartitionSpec()), lambda index: host[index])


def spread_over_mesh(tree, mesh):
    """Replicate every array of `tree` that lives on only some devices over the whole mesh.

    EasyDeL shards parameters over the mesh but leaves small variables, such as the RNG
    counters in `graphother`, on the first local device. One jitted step needs every argument
    on the same devices, which in a multi-process run means all processes' devices.
    """
    import jax

    mesh_devices = set(mesh.devices.flat)

    def spread(leaf):
        if not isinstance(leaf, jax.Array) or set(leaf.sharding.device_set) == mesh_devices:
            return leaf
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            # Typed PRNG keys have no NumPy form: move their raw data, then re-wrap it.
            data = spread(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        return replicated_host_array(mesh, leaf)

    return jax.tree_util.tree_map(spread, tree)
