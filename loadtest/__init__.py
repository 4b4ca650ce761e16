"""Open-loop load generator and benchmarks for the relay (``relay-loadtest``).

Modules, from the wire up:

- ``schedule``: constant, step and ramp rates; when each envelope is due (intended time).
- ``wire``: hand-encoded ClientFrames, the envelope content header, message ids.
- ``ledger``: what was sent and what arrived; reconciliation (delivered once, duplicated,
  missing).
- ``latency``: HdrHistogram recording and percentiles.
- ``devices``, ``streams``, ``traffic``, ``worker``: one worker process (registration,
  Connect streams, the sender loop, receipt and acks).
- ``runner``, ``report``, ``plot``, ``prom``, ``cli``: the coordinating process, its
  report, plot, Prometheus endpoint and command line.
- ``forwarder``: the bare grpc.aio baseline speaking the same Connect protocol.
- ``servers``, ``sweep``, ``profiling``, ``storebench``, ``bench``: ``make bench``.
"""
