"""The Cassandra backend of the relay's stores.

- ``session.CassandraSession``: the driver behind asyncio (prepared statements, bounded
  concurrent writes, single-partition batches); ``errors`` translates driver errors
  into ``relay.errors.Unavailable`` at this seam. Only these two import the driver.
- ``migrate``: versioned CQL migrations (``migrations/NNNN_name.cql``), applied by
  ``relayd migrate``, never by hand.
- ``queue.CassandraQueue``: ``relay.core.ports.MessageQueue`` (with ``accepted``,
  ``expiry`` and ``layout``). ``keyserver.cassandra_store`` holds the key stores.
"""
