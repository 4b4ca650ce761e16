"""End-to-end encryption core: primitives, PQXDH session setup and the Double Ratchet.

Pure computation, no I/O: the SDK's codec persists the state these modules hand it.
"""
