"""What the real iDDS is given: its configuration file and alembic.ini, read
back as iDDS and alembic read them (ConfigParser with interpolation)."""

from __future__ import annotations

import configparser
import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from swf_panda_workers.config.schema import Brokers
from swf_testbed.peers.idds_agent import (
    RESULTS_QUEUE,
    SLICES_QUEUE,
    PromptBrokers,
    alembic_config,
    idds_config,
)

BROKERS = Brokers(
    host="mq.example",
    port=61612,
    username="idds",
    password=SecretStr("p%w:d"),
    workers_topic="/topic/panda.workers.t1",
    transformer_topic="/topic/panda.transformer.t1",
)
PROMPT = PromptBrokers.on(BROKERS, slices="/queue/slices.t1", results="/topic/panda.results")
SQLITE = "sqlite:////tmp/idds.db"
POSTGRES = "postgresql://idds:s%2Fecret@127.0.0.1:55453/idds_1"
TEMPLATE = """[alembic]
script_location = idds.orm.base:alembic
sqlalchemy.url = driver://user:pass@localhost/dbname
version_table_schema = DOMA_IDDS

[loggers]
keys = root
"""


def read(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser()  # interpolation on, as iDDS and alembic read
    parser.read_string(text)
    return parser


def test_the_transceiver_alone_with_its_brokers(tmp_path: Path) -> None:
    config = read(idds_config(SQLITE, "t1", 4, PROMPT, tmp_path))
    assert config["main"]["agents"] == "transceiver"
    assert config["database"]["default"] == SQLITE
    assert "schema" not in config["database"]
    prompt = config["prompt"]
    assert (prompt["namespace"], prompt["num_threads"]) == ("t1", "4")
    expected = {
        "broker": "mq.example:61612",
        "destination": "/topic/panda.workers.t1",
        "username": "idds",
        "password": "p%w:d",
        "broker_timeout": 10,
    }
    assert json.loads(prompt["worker_subscriber_broker"]) == expected
    assert json.loads(prompt["worker_publisher_broker"]) == expected
    assert json.loads(prompt["transformer_broker"])["destination"] == "/queue/slices.t1"
    assert json.loads(prompt["result_broker"])["destination"] == "/topic/panda.results"
    assert config["common"]["logdir"] == str(tmp_path)  # not /var/log/idds


def test_no_namespace_means_none_configured(tmp_path: Path) -> None:
    assert "namespace" not in read(idds_config(SQLITE, None, 1, PROMPT, tmp_path))["prompt"]


def test_postgresql_gets_a_schema_in_both_files(tmp_path: Path) -> None:
    config = read(idds_config(POSTGRES, "t1", 1, PROMPT, tmp_path))
    assert config["database"]["default"] == POSTGRES  # the %2F survives interpolation
    assert config["database"]["schema"] == "doma_idds"
    alembic = read(alembic_config(TEMPLATE, POSTGRES))["alembic"]
    # iDDS's engine makes a bare postgresql:// psycopg2; alembic's must too.
    assert alembic["sqlalchemy.url"] == "postgresql+psycopg2" + POSTGRES[len("postgresql") :]
    assert alembic["version_table_schema"] == "doma_idds"
    assert alembic["script_location"] == "idds.orm.base:alembic"


def test_sqlite_keeps_the_version_table_in_the_file() -> None:
    alembic = read(alembic_config(TEMPLATE, SQLITE))["alembic"]
    assert alembic["sqlalchemy.url"] == SQLITE
    assert "version_table_schema" not in alembic


def test_the_meta_info_is_what_the_transformer_unwraps() -> None:
    meta = PROMPT.metainfo()
    assert set(meta) == {
        "transformer_broker",
        "transformer_broadcast_broker",
        "result_broker",
        "ejfat",
    }
    assert meta["transformer_broadcast_broker"]["destination"] == "/topic/panda.transformer.t1"
    for key in ("transformer_broker", "transformer_broadcast_broker", "result_broker"):
        assert set(meta[key]) == {"broker", "destination", "username", "password", "broker_timeout"}


def test_the_defaults_are_idds_sample_destinations() -> None:
    prompt = PromptBrokers.on(Brokers())
    assert (prompt.slices.destination, prompt.results.destination) == (SLICES_QUEUE, RESULTS_QUEUE)
    assert prompt.workers.username is None and prompt.workers.password is None


def test_threads_must_be_at_least_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_threads"):
        idds_config(SQLITE, "t1", 0, PROMPT, tmp_path)
