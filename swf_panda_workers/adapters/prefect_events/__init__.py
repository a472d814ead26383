"""Prefect events as each run's durable inbox and journal, in five modules
(import from the one that holds the name):

- ``schema``: event names, resource ids and event ids; the events made of
  bus messages (``message_event``), stream batches (``stream_event``, and
  ``unpacked`` back into per-message events), iDDS's REST answers, effects and
  stall reports; ``decode``, what an event carries; an effect's wire form
  (``encode_effect``, ``decode_effect``).
- ``history``: a run's stored events read back (``stored_events``,
  ``run_history``, ``fold_history``, ``history_when_reachable``), from
  ``history_start``.
- ``journal``: emitting events (``emit``) and proving them stored
  (``stored_ids``, ``until_stored``, emitting again what a server lost).
- ``feed``: a run's live feed (``RunFeed``, ``follow_run``, ``recorded_run``)
  and this process's one event subscription that serves every feed
  (``RunEventsHub``).
- ``outage``: what an unreachable Prefect server raises (``server_trouble``)
  and how long runs wait it out (``OUTAGE_TOLERANCE``).
"""
