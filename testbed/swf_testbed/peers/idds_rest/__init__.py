"""A simulated iDDS REST server, for tests and the demo, spoken to by the real
idds-client ``ClientManager`` and, through a PanDA relay, by panda-client:

- ``server``: the workflow-task API (``SimulatedIDDSRest``): routes, answers
  as iDDS words them, tasks, records, faults;
- ``panda_relay``: PanDA's ``relay_idds_command`` in front of it;
- ``control_client``: ``SimControl``, its fault-injection endpoints from
  another process;
- ``api``: what the server and the relay both speak (endpoints, paths, answers);
- ``__main__``: the command line, ``python -m swf_testbed.peers.idds_rest``.
"""
