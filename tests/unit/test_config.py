"""Settings from the YAML file, overridden by the environment; ConfigError names the key."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from swf_panda_workers.config.loading import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    ConfigError,
    config_path,
    load_settings,
    settings_from,
)
from swf_panda_workers.config.schema import Settings


def revealed(secret: SecretStr | None) -> str:
    """A secret the test set: it must be there."""
    assert secret is not None
    return secret.get_secret_value()


PANDA_ATTRIBUTE_KEYS = {
    "vo",
    "queue",
    "site",
    "cloud",
    "working_group",
    "priority",
    "core_count",
    "ram_count",
    "num_workers",
    "max_walltime",
    "max_attempt",
    "idle_timeout",
    "username",
    "task_type",
    "processing_type",
}


@pytest.fixture(autouse=True)
def no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return path


def test_default_file_loads_with_the_documented_values() -> None:
    settings = load_settings(environ={})

    assert DEFAULT_CONFIG.is_file()
    assert settings.transceiver.namespace == "dev"
    assert settings.transceiver.mode == "message"
    assert settings.transceiver.timetolive == 12 * 3600 * 1000
    assert (settings.brokers.host, settings.brokers.port) == ("localhost", 61613)
    assert settings.brokers.password is None
    assert settings.brokers.workers_topic == "/topic/panda.workers"
    assert settings.brokers.transformer_topic == "/topic/panda.transformer"
    assert settings.brokers.results_destination == "/queue/panda.results.worker"
    assert settings.panda.site == "BNL-OSG"
    assert settings.panda.transform_tag == "fastproc"
    assert settings.slice.processing_time == 30.0
    assert settings.slice.cooldown == 60.0
    assert settings.timeouts.created_workflow_task == 300.0
    assert settings.prefect.runner_limit == 40
    assert settings.prefect.flow_runs == "in_process"


def test_default_file_agrees_with_the_model_defaults() -> None:
    assert load_settings(DEFAULT_CONFIG, environ={}) == Settings()


def test_config_env_var_chooses_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "brokers:\n  host: from-env-file\n")
    monkeypatch.setenv(CONFIG_ENV, str(path))

    assert load_settings(environ={}).brokers.host == "from-env-file"


def test_explicit_path_beats_the_config_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "absent.yaml"))
    path = write(tmp_path, "brokers:\n  host: explicit\n")

    assert load_settings(path, environ={}).brokers.host == "explicit"


@pytest.mark.parametrize(
    ("variable", "value", "read", "expected"),
    [
        ("ACTIVEMQ_HOST", "mq.example.org", lambda s: s.brokers.host, "mq.example.org"),
        ("ACTIVEMQ_PORT", "61616", lambda s: s.brokers.port, 61616),
        ("ACTIVEMQ_USER", "agent", lambda s: s.brokers.username, "agent"),
        (
            "ACTIVEMQ_PASSWORD",
            "hunter2",
            lambda s: s.brokers.password.get_secret_value(),
            "hunter2",
        ),
        ("ACTIVEMQ_USE_SSL", "true", lambda s: s.brokers.use_ssl, True),
        (
            "ACTIVEMQ_SSL_CA_CERTS",
            "/etc/ca.pem",
            lambda s: s.brokers.ssl_ca_certs,
            Path("/etc/ca.pem"),
        ),
        (
            "ACTIVEMQ_SSL_CERT_FILE",
            "/etc/me.pem",
            lambda s: s.brokers.ssl_cert_file,
            Path("/etc/me.pem"),
        ),
        ("SWF_NAMESPACE", "prod", lambda s: s.transceiver.namespace, "prod"),
        ("SWF_PANDA_MODE", "rest", lambda s: s.transceiver.mode, "rest"),
        ("SWF_LISTENER_REPLICA", "host-b", lambda s: s.transceiver.replica, "host-b"),
        (
            "SWF_MONITOR_URL",
            "https://mon.example/swf-monitor/",
            lambda s: s.monitor.url,
            "https://mon.example/swf-monitor",
        ),
        ("SWF_API_TOKEN", "t0ken", lambda s: s.monitor.token.get_secret_value(), "t0ken"),
        ("SWF_MONITOR_INTERVAL", "15", lambda s: s.monitor.interval, 15.0),
    ],
)
def test_environment_overrides(variable: str, value: str, read: Any, expected: Any) -> None:
    assert read(load_settings(environ={variable: value})) == expected


@pytest.mark.parametrize(
    ("environ", "listener_id"),
    [
        # What the single listener always was: its durable subscription carries on.
        ({"SWF_NAMESPACE": "prod"}, "swf-panda-workers-prod"),
        ({"SWF_NAMESPACE": "prod", "SWF_LISTENER_REPLICA": "a"}, "swf-panda-workers-prod-a"),
        ({"SWF_NAMESPACE": "prod", "SWF_LISTENER_REPLICA": "b"}, "swf-panda-workers-prod-b"),
    ],
)
def test_each_replica_has_its_own_listener_id(environ: dict[str, str], listener_id: str) -> None:
    assert load_settings(environ=environ).transceiver.listener_id == listener_id


def test_environment_beats_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "brokers:\n  host: file-host\n  port: 1234\n")

    settings = load_settings(path, environ={"ACTIVEMQ_HOST": "env-host"})

    assert settings.brokers.host == "env-host"
    assert settings.brokers.port == 1234


def test_environment_fills_a_section_the_file_lacks(tmp_path: Path) -> None:
    path = write(tmp_path, "panda:\n  site: CERN\n")

    settings = load_settings(path, environ={"SWF_NAMESPACE": "test", "ACTIVEMQ_PORT": "1"})

    assert settings.transceiver.namespace == "test"
    assert settings.brokers.port == 1
    assert settings.panda.site == "CERN"


def test_empty_environment_values_are_ignored() -> None:
    settings = load_settings(environ={"ACTIVEMQ_HOST": "", "SWF_NAMESPACE": ""})

    assert settings.brokers.host == "localhost"
    assert settings.transceiver.namespace == "dev"


def test_password_is_secret_and_never_shown() -> None:
    settings = load_settings(environ={"ACTIVEMQ_PASSWORD": "hunter2"})

    assert isinstance(settings.brokers.password, SecretStr)
    assert settings.brokers.password.get_secret_value() == "hunter2"
    for shown in (
        repr(settings),
        str(settings),
        repr(settings.brokers),
        str(settings.brokers),
        settings.model_dump_json(),
        str(settings.model_dump()),
    ):
        assert "hunter2" not in shown


def test_password_from_the_file_is_secret_too(tmp_path: Path) -> None:
    path = write(tmp_path, "brokers:\n  password: s3cret\n")

    settings = load_settings(path, environ={})

    assert revealed(settings.brokers.password) == "s3cret"
    assert "s3cret" not in repr(settings)


YAML_SECRETS = [("brokers", "password", "ACTIVEMQ_PASSWORD"), ("monitor", "token", "SWF_API_TOKEN")]


@pytest.mark.parametrize(("section", "key", "variable"), YAML_SECRETS)
def test_a_secret_in_the_file_works_but_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, section: str, key: str, variable: str
) -> None:
    path = write(tmp_path, f"{section}:\n  {key}: s3cret\n")

    with caplog.at_level(logging.WARNING, logger="swf_panda_workers.config.loading"):
        settings = load_settings(path, environ={})

    assert getattr(getattr(settings, section), key).get_secret_value() == "s3cret"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"{section}.{key}" in warnings[0] and f"{variable}_FILE" in warnings[0]
    assert str(path) in warnings[0]
    assert "s3cret" not in caplog.text


@pytest.mark.parametrize(("section", "key", "variable"), YAML_SECRETS)
def test_no_warning_when_the_environment_supplies_the_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, section: str, key: str, variable: str
) -> None:
    path = write(tmp_path, f"{section}:\n  {key}: s3cret\n")

    with caplog.at_level(logging.WARNING, logger="swf_panda_workers.config.loading"):
        settings = load_settings(path, environ={variable: "from-env"})
        load_settings(environ={variable: "from-env"})

    assert getattr(getattr(settings, section), key).get_secret_value() == "from-env"
    assert not caplog.records


@pytest.mark.parametrize(
    ("written", "read"),
    [
        (b"hunter2\n", "hunter2"),  # what `echo hunter2 > file` writes
        (b"hunter2", "hunter2"),
        (b"hunter2\r\n", "hunter2"),
        (b"hunter2\n\n", "hunter2\n"),  # one newline only: the rest is the secret's
        (b" spaced pass \n", " spaced pass "),
        (b"a\rb\n", "a\rb"),  # a carriage return inside is kept as it is
        ("pässwörd\n".encode(), "pässwörd"),
    ],
)
def test_password_file(tmp_path: Path, written: bytes, read: str) -> None:
    secret = tmp_path / "password"
    secret.write_bytes(written)

    settings = load_settings(environ={"ACTIVEMQ_PASSWORD_FILE": str(secret)})

    assert revealed(settings.brokers.password) == read


def test_user_file_and_password_file_beat_the_configuration_file(tmp_path: Path) -> None:
    (tmp_path / "user").write_text("agent\n")
    (tmp_path / "password").write_text("from-file\n")
    path = write(tmp_path, "brokers:\n  username: yaml-user\n  password: yaml-pass\n")

    settings = load_settings(
        path,
        environ={
            "ACTIVEMQ_USER_FILE": str(tmp_path / "user"),
            "ACTIVEMQ_PASSWORD_FILE": str(tmp_path / "password"),
        },
    )

    assert settings.brokers.username == "agent"
    assert revealed(settings.brokers.password) == "from-file"


@pytest.mark.parametrize("name", ["ACTIVEMQ_USER", "ACTIVEMQ_PASSWORD", "SWF_API_TOKEN"])
def test_a_value_and_its_file_together_are_an_error(tmp_path: Path, name: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text("in-the-file\n")

    with pytest.raises(ConfigError, match=f"both {name} and {name}_FILE are set") as caught:
        load_settings(environ={name: "in-the-env", f"{name}_FILE": str(secret)})

    assert "in-the-file" not in str(caught.value) and "in-the-env" not in str(caught.value)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: d / "absent", "cannot read .*absent: No such file"),
        (lambda d: d, "cannot read"),  # a directory
        (lambda d: _written(d / "empty", b""), "empty is empty"),
        (lambda d: _written(d / "newline", b"\n"), "newline is empty"),
        (lambda d: _written(d / "binary", b"s3cret\xff\n"), "binary is not UTF-8"),
    ],
)
def test_unusable_password_files_name_the_variable_and_file(
    tmp_path: Path, make: Any, says: str
) -> None:
    path = make(tmp_path)

    with pytest.raises(ConfigError, match=f"^ACTIVEMQ_PASSWORD_FILE: .*{says}") as caught:
        load_settings(environ={"ACTIVEMQ_PASSWORD_FILE": str(path)})

    assert "s3cret" not in str(caught.value)


def _written(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "yaml_text",
    [
        "brokers:\n  password: s3cret: more\n",  # a syntax error on the password's line
        'brokers:\n  password: "s3cret\n',
        "brokers:\n  password: [s3cret\n",
        "brokers:\n  password: s3cret\n   port: 1\n",
        "brokers:\n  password: s3cret\n  port: many\n",  # a bad value beside it
        "brokers:\n  password: s3cret\n  pasword: s3cret\n",  # a misspelt key
        "brokers:\n  password: [s3cret]\n",  # a password of the wrong type
        "brokers:\n  password: {s3cret: 1}\n",
    ],
)
def test_configuration_errors_never_show_the_password(tmp_path: Path, yaml_text: str) -> None:
    path = write(tmp_path, yaml_text)

    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})

    assert "s3cret" not in str(caught.value)
    assert str(path) in str(caught.value)


def test_yaml_errors_still_say_where(tmp_path: Path) -> None:
    path = write(tmp_path, "brokers:\n  password: s3cret: more\n")

    with pytest.raises(
        ConfigError,
        match=r"not valid YAML: mapping values are not allowed "
        r"here at line 2, column 19",
    ):
        load_settings(path, environ={})


def test_a_client_key_needs_its_certificate() -> None:
    with pytest.raises(ConfigError, match=r"brokers: .*ssl_key_file is set but ssl_cert_file"):
        load_settings(environ={"ACTIVEMQ_SSL_KEY_FILE": "/etc/me.key"})


def test_tls_settings_from_the_environment() -> None:
    settings = load_settings(
        environ={
            "ACTIVEMQ_USE_SSL": "true",
            "ACTIVEMQ_SSL_CA_CERTS": "/etc/ca.pem",
            "ACTIVEMQ_SSL_CERT_FILE": "/etc/me.pem",
            "ACTIVEMQ_SSL_KEY_FILE": "/etc/me.key",
        }
    )

    brokers = settings.brokers
    assert brokers.use_ssl is True
    assert (brokers.ssl_ca_certs, brokers.ssl_cert_file, brokers.ssl_key_file) == (
        Path("/etc/ca.pem"),
        Path("/etc/me.pem"),
        Path("/etc/me.key"),
    )


@pytest.mark.parametrize(
    ("yaml_text", "environ", "key"),
    [
        ("brokers:\n  prot: 61613\n", {}, "brokers.prot"),
        ("brokerz:\n  port: 61613\n", {}, "brokerz"),
        ("brokers:\n  port: many\n", {}, "brokers.port"),
        ("brokers:\n  port: 70000\n", {}, "brokers.port"),
        ("brokers: 5\n", {}, "brokers"),
        ("brokers: [a, b]\n", {}, "brokers"),
        ("brokers: text\n", {"ACTIVEMQ_HOST": "h"}, "brokers"),
        ("panda:\n  priority: high\n", {}, "panda.priority"),
        ("panda:\n  core_count: 0\n", {}, "panda.core_count"),
        ("transceiver:\n  mode: carrier-pigeon\n", {}, "transceiver.mode"),
        ("prefect:\n  flow_runs: thread\n", {}, "prefect.flow_runs"),
        ("transceiver:\n  namespace: \"a' OR '1\"\n", {}, "transceiver.namespace"),
        ("transceiver:\n  timetolive: 0\n", {}, "transceiver.timetolive"),
        ("slice:\n  processing_time: 0\n", {}, "slice.processing_time"),
        ("slice:\n  cooldown: -1\n", {}, "slice.cooldown"),
        ("", {"ACTIVEMQ_PORT": "abc"}, "brokers.port"),
        ("", {"SWF_NAMESPACE": "bad namespace"}, "transceiver.namespace"),
        ("", {"SWF_LISTENER_REPLICA": "a/b"}, "transceiver.replica"),
    ],
)
def test_bad_settings_name_the_key(
    tmp_path: Path, yaml_text: str, environ: dict[str, str], key: str
) -> None:
    path = write(tmp_path, yaml_text)

    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=environ)

    text = str(caught.value)
    assert f"{key}: " in text
    assert str(path) in text


def test_settings_from_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^my-source: brokers\.prot: "):
        settings_from({"brokers": {"prot": 1}}, {}, "my-source")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"brokers: [unclosed\n", "is not valid YAML"),
        (b"brokers:\n  host: a\n   port: 1\n", "is not valid YAML"),
        (b"- brokers\n- panda\n", "top level must be a mapping"),
        (b"just text\n", "top level must be a mapping"),
        (b"brokers:\n  host: \xff\xfe\n", "is not UTF-8"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes, says: str) -> None:
    path = tmp_path / "settings.yaml"
    path.write_bytes(content)

    with pytest.raises(ConfigError, match=says):
        load_settings(path, environ={})


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing\n"), environ={}) == Settings()


def test_empty_section_means_its_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "brokers:\n"), environ={}).brokers.port == 61613


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError, match="cannot read configuration") as caught:
        load_settings(missing, environ={})
    assert str(missing) in str(caught.value)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_panda_task_attributes_are_the_protocol_keys() -> None:
    attributes = Settings().panda.task_attributes()

    # The seed's names, and those iDDS 2.6.21 reads for two of them.
    assert set(attributes) == PANDA_ATTRIBUTE_KEYS | {"walltime", "memory_per_core"}
    assert attributes["queue"] == "BNL_PanDA_1"
    assert attributes["ram_count"] == attributes["memory_per_core"] == 4000
    assert attributes["max_walltime"] == attributes["walltime"] == 3600


def test_results_destination_and_its_older_name() -> None:
    assert Settings().brokers.results_destination == "/queue/panda.results.worker"
    older = settings_from({"brokers": {"results_queue": "/queue/mine"}}, {})
    assert older.brokers.results_destination == "/queue/mine"
    topic = settings_from({"brokers": {"results_destination": "/topic/panda.results"}}, {})
    assert topic.brokers.results_on_topic and not older.brokers.results_on_topic
    with pytest.raises(ConfigError, match="both set"):
        settings_from(
            {"brokers": {"results_queue": "/queue/a", "results_destination": "/queue/b"}}, {}
        )
    with pytest.raises(ConfigError, match="results_destination"):
        settings_from({"brokers": {"results_destination": "panda.results"}}, {})


def test_idds_namespace() -> None:
    assert Settings().transceiver.requests_namespace == "dev"
    other = settings_from({"transceiver": {"namespace": "alice", "idds_namespace": "dev"}}, {})
    assert other.transceiver.requests_namespace == "dev"
    with pytest.raises(ConfigError, match="idds_namespace"):
        settings_from({"transceiver": {"idds_namespace": "dev' OR '1'='1"}}, {})


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.brokers.port = 1  # type: ignore[misc]


def test_search_path_user_file_then_installation_then_packaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    environ = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    user = tmp_path / "xdg" / "swf_panda_workers" / "swf_panda_workers.yaml"
    installed = tmp_path / "prefix" / "etc" / "swf_panda_workers" / "swf_panda_workers.yaml"

    assert config_path(environ=environ) == DEFAULT_CONFIG
    installed.parent.mkdir(parents=True)
    installed.write_text("brokers:\n  host: installed\n")
    assert config_path(environ=environ) == installed
    user.parent.mkdir(parents=True)
    user.write_text("brokers:\n  host: user\n")
    assert config_path(environ=environ) == user
    assert config_path(environ={**environ, CONFIG_ENV: "/etc/named.yaml"}) == Path(
        "/etc/named.yaml"
    )
    assert config_path("given.yaml", environ={**environ, CONFIG_ENV: "/etc/named.yaml"}) == Path(
        "given.yaml"
    )


def test_user_config_dir_defaults_to_dot_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    user = tmp_path / ".config" / "swf_panda_workers" / "swf_panda_workers.yaml"
    user.parent.mkdir(parents=True)
    user.write_text("{}\n")

    assert config_path(environ={}) == user


def test_a_named_file_that_is_missing_is_an_error_not_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "typo.yaml"))

    with pytest.raises(ConfigError, match=r"typo\.yaml"):
        load_settings(environ={})


def test_monitor_is_off_by_default() -> None:
    monitor = load_settings(environ={}).monitor

    assert monitor.url is None and monitor.token is None
    assert (monitor.interval, monitor.timeout) == (60.0, 5.0)
    assert monitor.agent_type == "panda_workers"
    assert monitor.instance_name is None


def test_monitor_token_from_its_file_is_secret(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t0ken-from-file\n")

    settings = load_settings(environ={"SWF_API_TOKEN_FILE": str(tmp_path / "token")})

    assert revealed(settings.monitor.token) == "t0ken-from-file"
    assert "t0ken" not in repr(settings) and "t0ken" not in str(settings.model_dump())


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mon.example:8000", "monitor.url: String should match pattern"),
        ("ftp://mon.example", "monitor.url: String should match pattern"),
        ("https://user:s3cret@mon.example", "monitor.url: .*credentials in the URL"),
    ],
)
def test_unusable_monitor_urls(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        load_settings(environ={"SWF_MONITOR_URL": url})

    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("yaml_text", "says"),
    [
        ("monitor:\n  interval: 0\n", "monitor.interval"),
        ("monitor:\n  timeout: -1\n", "monitor.timeout"),
        ("monitor:\n  agent_type: a_type_longer_than_twenty\n", "monitor.agent_type"),
        ("monitor:\n  instance_name: has space\n", "monitor.instance_name"),
        ("monitor:\n  urll: http://x\n", "monitor.urll"),
    ],
)
def test_bad_monitor_settings_name_the_key(tmp_path: Path, yaml_text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_settings(write(tmp_path, yaml_text), environ={})


@pytest.mark.parametrize("token", ["t0k en", "t0ken\nmore", "t0k\x00en", "t0kén"])
def test_a_token_that_cannot_travel_in_a_header(token: str) -> None:
    with pytest.raises(
        ConfigError,
        match=r"monitor\.token: .*holds a space, a control or "
        r"a non-ASCII character",
    ) as caught:
        load_settings(environ={"SWF_API_TOKEN": token})

    assert "t0k" not in str(caught.value)
