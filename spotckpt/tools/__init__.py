"""The tools around the library: the ``spotckpt`` command (:mod:`.cli`), ``spotckpt bench``,
``spotckpt simulate`` and the local S3 server for trying them (:mod:`.s3server`). They use the
library like any program does; nothing in the library imports them.
"""
