"""The Cassandra driver session and its error translation, shared by both services."""
