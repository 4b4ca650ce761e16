"""Command-line entry points: ``relayd`` (servers) and ``relayctl`` (device CLI)."""
