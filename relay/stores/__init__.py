"""Storage backends behind the protocols of ``relay.core.ports``."""
