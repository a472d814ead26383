"""The service configuration, in two modules (import from the one that holds the name):

- ``schema``: the settings and their sections as pydantic models (``Settings``,
  ``Transceiver``, ``Brokers``, ``Panda``, ``Slice``, ``Scaling``, ``Timeouts``,
  ``Idds``, ``Prefect``, ``Monitor``, ``Metrics``) and their validation; no
  file or environment is read there.
- ``loading``: where the file is (``config_path``, ``CONFIG_ENV``,
  ``DEFAULT_CONFIG``), reading it and the environment's overrides and secret
  files (``load_settings``, ``settings_from``, ``ENV_OVERRIDES``,
  ``REPLICA_ENV``), and ``ConfigError``.
"""
