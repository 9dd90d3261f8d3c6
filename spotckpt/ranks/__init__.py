"""Internal: several ranks and hosts -- no stable API.

    dist    the Coordinator (exchanges over gloo, hosts and their leaders), the request channel
            and the save agreement
    shard   sharded tensors (DTensor, ShardedTensor): their boxes, reads and resharding

Imports only :mod:`spotckpt.format` and the public base modules.
"""
