"""What the relay node and the key directory share.

The gRPC server base, the error to status mapping, protobuf conversions of shared
types, the storage driver sessions (SQLite worker, Cassandra session) and device events.

Neither service reaches into the other's ``server`` or ``store`` modules; both import
this package instead (tests/test_layers.py checks it).
"""
