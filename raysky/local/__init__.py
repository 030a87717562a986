"""Local runs: the demo, the embedded S3 endpoint (moto on 127.0.0.1) and loopback networking.

Nothing here is needed to train, score or serve on a cluster; it is what ``raysky demo``, the
tests and the benchmarks use to run the real pipeline on one machine. Import each name from its
module.
"""

__all__: list[str] = []
