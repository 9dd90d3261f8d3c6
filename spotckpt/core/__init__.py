"""Internal: the core of a checkpoint -- no stable API; use :mod:`spotckpt` (``CheckpointManager``).

One process's way from a state to a committed step and back::

    config        where checkpoints go (env, SageMaker's checkpointconfig.json)
    torch_state   a user's state <-> (tree, tensors); the all-or-nothing load plan
    stage         snapshots into reused (pinned) host buffers
    local         the local directory: staging, atomic commit, status, retention, import
    steps         the commit pipeline every writer goes through (save, adopt, DCP)
    persist       the persist thread that runs async writes and retention
    layouts       what a step's files are and who loads them (state, DCP, folder)
    adopt         copying another program's folder in (the folder layout's writer)
    restore       the candidate walk: choose, fetch, verify, load (agreed across ranks)
    protocols     StepSource / RemoteStore: what the core needs of remote storage
    preemption    SIGTERM and the EC2 spot notice, the deadline
    metrics       metric lines and counters

Imports: :mod:`spotckpt.format` (the on-disk format), :mod:`spotckpt.ranks` and the public
base modules (errors, events, policy); never :mod:`spotckpt.remote` or :mod:`spotckpt.tools`.
"""
