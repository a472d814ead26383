"""Scripts that the real peers' interpreter (``.venv-peers/bin/python``) runs
by path, inside the real peers' processes.

Each may import only the standard library, the peers' packages (idds,
pandaclient, sqlalchemy) and its siblings here, never prefect or
swf_panda_workers: that interpreter has neither. ``payload_schedule`` is
standard library only, so the project imports it too (to write the schedule
that the transformer wrapper reads).
"""
