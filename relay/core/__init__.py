"""The relay's domain core: it decides; servicers translate and stores persist.

Imports nothing from grpc, protobuf, cassandra or redis.
"""
