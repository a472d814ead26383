"""The benchmark of the whole system: ``python -m bench --help``.

It drives the real parts (ActiveMQ, the Prefect server, the runner, the
listener) with simulated peers, and prints (and saves as JSON) latencies,
throughput, lost or duplicated effects, memory and CPU. It is not part of
the test suite: its figures are measurements, never assertions.
"""
