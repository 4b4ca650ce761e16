"""The key directory: device registration, identity keys and prekeys.

Layers point one way::

    servicer.py   gRPC <-> model translation only (protobuf lives here and in client.py)
        |
    directory.py  the core: validation, signature checks, limits, request authentication
        |
    ports.py      storage protocols, one per concern: DeviceDirectory, PrekeyStore,
        |         PqPrekeyStore, PrekeyHandout (bundled as KeyStores)
        |
    sqlite_store.py, cassandra_store.py   the embedded and the Cassandra backend of all

``app.py`` is the composition root of a key directory process; ``client.py`` holds what
devices need to make signed requests. The core imports no grpc or protobuf module.
"""
