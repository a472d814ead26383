"""A local testbed for development, tests and the demo: the simulated peers
(control system, iDDS, PanDA, transformers, the monitor) and the real ones run
from ``.venv-peers`` (``peers/``), the launchers of a local ActiveMQ broker,
PostgreSQL cluster and Prefect stack (``launchers/``), and the demo that puts
a whole session together on one machine (``demo.py``). It depends on the
product, swf-panda-workers, and the product never imports it: it is never
shipped in the product image."""
