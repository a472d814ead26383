"""Local servers for one machine: the ActiveMQ broker, a PostgreSQL cluster
and the stack (Prefect server, runner, listener) the tests and the demo run."""
