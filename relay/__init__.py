"""End-to-end-encrypted message relay: relay node, SDK and CLI.

Layers point one way: ``relay.server`` (gRPC servicers) -> ``relay.core`` (decisions) ->
``relay.core.ports`` (storage protocols) <- ``relay.stores`` (backends). The core imports no
grpc, protobuf, cassandra or redis module; ``tests/test_layers.py`` checks that.
"""

__version__ = "0.1.0"
