"""The service configuration's schema: one pydantic model per section, and
``Settings``, all of them. Validation only: reading the YAML file and the
environment is ``swf_panda_workers.config.loading``'s.

Sections follow the seed agent's file (transceiver, brokers, panda, slice) plus
the waits this service adds (timeouts). Unknown keys are errors, so a typo is
reported with its path instead of silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Transceiver(_Section):
    namespace: str = Field(
        default="dev",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="deployment namespace: selector on inbound, header on outbound",
    )
    mode: Literal["message", "rest"] = Field(
        default="message", description="how iDDS is reached: the bus, or its REST API"
    )
    timetolive: int = Field(
        default=12 * 3600 * 1000, gt=0, description="message time to live, milliseconds"
    )
    replica: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="this listener's name among the listeners of one namespace; stable "
        "across its restarts (it names its durable subscription); unset: the only one",
    )
    idds_namespace: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="the namespace iDDS's prompt transceiver selects on (its [prompt] "
        "namespace): our requests carry it as their namespace header, and its replies, which "
        "carry it (or none), are taken when they name one of our runs; unset: ours",
    )

    @property
    def requests_namespace(self) -> str:
        """The namespace header of what we send to iDDS."""
        return self.idds_namespace or self.namespace

    @property
    def listener_id(self) -> str:
        """The listener's STOMP client-id and durable subscription name. Each
        replica needs its own (the broker refuses a client-id already
        connected) and the same one after a restart (its durable subscription
        kept what came meanwhile). Without a replica name it is what a single
        listener always used, so an existing subscription carries on."""
        base = f"swf-panda-workers-{self.namespace}"
        return f"{base}-{self.replica}" if self.replica else base


class Brokers(_Section):
    host: str = "localhost"
    port: int = Field(default=61613, gt=0, lt=65536)
    username: str | None = None
    password: SecretStr | None = None
    use_ssl: bool = Field(default=False, description="STOMP over TLS (the broker's stomp+ssl)")
    ssl_ca_certs: Path | None = Field(
        default=None,
        description="PEM CA bundle the broker's certificate must chain to; none: the system's CAs",
    )
    ssl_cert_file: Path | None = Field(
        default=None, description="PEM client certificate, for brokers requiring one"
    )
    ssl_key_file: Path | None = Field(
        default=None, description="its PEM private key, unencrypted (default: in ssl_cert_file)"
    )
    workers_topic: str = "/topic/panda.workers"
    transformer_topic: str = "/topic/panda.transformer"
    results_destination: str = Field(
        default="/queue/panda.results.worker",
        pattern=r"^/(queue|topic)/[^\s,]+$",
        description="where the transformers send slice results (iDDS's result_broker): a "
        "queue, shared with other namespaces (each takes its own runs' results, by selector), "
        "or a topic (swf-transform's default, /topic/panda.results), durably subscribed; "
        "results_queue is the older name of this key",
    )
    results_grace: float = Field(
        default=600.0,
        ge=0,
        description="seconds a run's results are still taken from a "
        "results queue after its flow run has finished (late results of stopped transformers)",
    )
    dead_letter_queue: str = "/queue/panda.workers.DLQ"
    prefetch_size: int = Field(
        default=1000, gt=0, description="unacked messages the broker may push at once"
    )
    heartbeat_ms: int = Field(
        default=10000, ge=0, description="period of the STOMP heart-beats we send (ms)"
    )

    @model_validator(mode="before")
    @classmethod
    def _older_key_names(cls, values: Any) -> Any:
        if isinstance(values, dict) and "results_queue" in values:
            if "results_destination" in values:
                raise ValueError(
                    "results_queue and results_destination are both set; keep results_destination"
                )
            values = {**values}
            values["results_destination"] = values.pop("results_queue")
        return values

    @property
    def results_on_topic(self) -> bool:
        return self.results_destination.startswith("/topic/")

    @model_validator(mode="after")
    def _key_needs_its_certificate(self) -> Brokers:
        # stomp.py would silently connect without the client certificate.
        if self.ssl_key_file is not None and self.ssl_cert_file is None:
            raise ValueError("ssl_key_file is set but ssl_cert_file is not")
        return self


class Panda(_Section):
    """PanDA task attributes, forwarded as workflow.content.panda_attributes."""

    vo: str = "wlcg"
    queue: str = "BNL_PanDA_1"
    site: str = "BNL-OSG"
    cloud: str = "US"
    working_group: str = "EIC"
    priority: int = 900
    core_count: int = Field(default=1, gt=0)
    ram_count: int = Field(default=4000, gt=0, description="MB per core")
    num_workers: int = Field(default=1, gt=0)
    max_walltime: int = 3600
    max_attempt: int = 3
    idle_timeout: int = 120
    username: str = "EICFast"
    task_type: str = "EICFast"
    processing_type: str | None = "EICFast"
    transform_tag: str = "fastproc"
    requester: str = "panda-worker"
    campaign: str = "testbed"
    campaign_tag: str = "test"
    scope: str | None = Field(default=None, description="default EIC_<YYYY>")

    def task_attributes(self) -> dict[str, Any]:
        """The PanDA task parameters iDDS expects in panda_attributes: the
        seed's names, and the names iDDS 2.6.21 reads for two of them
        (``walltime`` for max_walltime, ``memory_per_core`` for ram_count)."""
        seed_names = self.model_dump(
            include={
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
        )
        return {**seed_names, "walltime": self.max_walltime, "memory_per_core": self.ram_count}


class Slice(_Section):
    processing_time: float = Field(
        default=30.0, gt=0, description="expected seconds per slice (scaling threshold)"
    )
    cooldown: float = Field(
        default=60.0, ge=0, description="seconds between two adjust_worker for one run"
    )


class Scaling(_Section):
    """How a run's workers are sized (swf_panda_workers.core.policies) and how it ends."""

    policy: Literal["proportional", "reference"] = Field(
        default="proportional",
        description="proportional: size from the run's demand; reference: the seed's "
        "1.2x/1.5x rule (slice.processing_time, slice.cooldown)",
    )
    window: float = Field(
        default=120.0, gt=0, description="seconds of slice results the demand is measured over"
    )
    percentile: float = Field(
        default=90.0, gt=0, le=100, description="percentile of processing time sized for"
    )
    target_utilisation: float = Field(default=0.8, gt=0, le=1)
    drain_deadline: float = Field(
        default=300.0, gt=0, description="seconds the backlog is to drain within"
    )
    backlog_from_waits: bool = Field(
        default=True,
        description="estimate the backlog from the slices' queue waits "
        "(processing_start_at - requested_at)",
    )
    min_workers: int = Field(default=1, ge=0)
    max_workers: int = Field(default=100, gt=0)
    max_total_cores: int | None = Field(default=None, gt=0)
    max_total_memory_mb: int | None = Field(default=None, gt=0)
    tolerance: float = Field(
        default=0.1, ge=0, lt=1, description="relative change inside which nothing is asked"
    )
    up_window: float = Field(
        default=30.0, ge=0, description="seconds a higher need must hold before scaling up"
    )
    down_window: float = Field(
        default=300.0, ge=0, description="seconds a lower need must hold before scaling down"
    )
    max_step_up: float = Field(
        default=1.0,
        gt=0,
        description="largest increase per request, as a fraction of the current size",
    )
    max_step_down: float = Field(default=0.5, gt=0, le=1)
    rampup: float = Field(
        default=300.0,
        ge=0,
        description="seconds requested workers may "
        "take to appear (the announcement's worker_rampup_time wins)",
    )
    min_results: int = Field(default=5, gt=0)
    tick: float = Field(
        default=5.0, gt=0, description="seconds between looks at the demand when no result arrives"
    )
    end: Literal["stop", "drain"] = Field(
        default="drain",
        description="at end_run: stop the transformers at once (the "
        "seed), or once the backlog has drained",
    )
    drain_timeout: float = Field(
        default=900.0, ge=0, description="seconds after end_run a drain may take"
    )
    drain_quiet: float = Field(
        default=10.0,
        gt=0,
        description="the backlog is empty when no result came for "
        "this long, or for twice the slices' processing time if longer",
    )

    @model_validator(mode="after")
    def _bounds_in_order(self) -> Scaling:
        if self.min_workers > self.max_workers:
            raise ValueError("min_workers is above max_workers")
        return self


class Timeouts(_Section):
    created_workflow_task: float = Field(
        default=300.0, gt=0, description="seconds to wait for iDDS to create the task"
    )
    closed_workflow_task: float = Field(
        default=120.0, gt=0, description="seconds to wait for iDDS to confirm the close"
    )
    run_end: float = Field(
        default=48 * 3600.0,
        gt=0,
        description="seconds after run_imminent to end a run whose end_run never came",
    )
    stall: float = Field(
        default=60.0,
        gt=0,
        description="seconds a run may wait for something it needs (iDDS's ids, its "
        "scaling sub-flow to start, a close confirmation, Prefect storing its journal) "
        "before it is reported stalled, with what it waits for",
    )


class Idds(_Section):
    """How REST mode reaches iDDS. Credentials are not here: idds-client reads
    them from its usual environment (IDDS_AUTH_TYPE, X509_USER_PROXY,
    IDDS_OIDC_TOKEN or IDDS_OIDC_TOKEN_FILE, IDDS_VO)."""

    route: Literal["direct", "panda_relay"] = Field(
        default="direct",
        description="direct: idds-client to the iDDS server; panda_relay: through the "
        "PanDA server (panda-client)",
    )
    host: str | None = Field(
        default=None,
        description="iDDS REST base URL, e.g. https://host:443/idds; "
        "IDDS_HOST overrides it, as in idds-client",
    )
    timeout: float = Field(default=30.0, gt=0, description="seconds per HTTP request")
    ca_certs: Path | None = Field(
        default=None,
        description="PEM CA bundle, or a directory of hashed CA certificates "
        "(/etc/grid-security/certificates), iDDS's server certificate must chain to "
        "(route direct); none: not verified, as idds-client 2.6.21 never verifies it; "
        "IDDS_CA_CERTS",
    )
    retry_delays: tuple[float, ...] = Field(
        default=(2.0, 5.0, 10.0),
        description="seconds before each retry of a failed request; one retry per entry",
    )


class Prefect(_Section):
    deployment: str = Field(
        default="swf-run/panda-workers", description="<flow name>/<deployment name>"
    )
    runner_limit: int = Field(default=40, gt=0, description="flow runs served at once")
    flow_runs: Literal["in_process", "subprocess"] = Field(
        default="in_process",
        description="where the runner executes flow runs: in_process (each a task of the "
        "runner's own process, deployments/in_process.py) or subprocess (Prefect's runner: "
        "a process each, about 100 MB)",
    )
    # `serve` only (swf_panda_workers/state_dir.py, service/serve.py):
    server_port: int = Field(
        default=4200,
        gt=0,
        lt=65536,
        description="port of the Prefect server `serve` starts (none when PREFECT_API_URL "
        "is set); a server it did not start answering there is an error",
    )
    state_dir: Path | None = Field(
        default=None,
        description="`serve`'s state: the home of its Prefect server (the database: every "
        "run's flow runs, events, journal, artifacts) and its logs; SWF_STATE_DIR; unset: "
        "PREFECT_HOME, else $XDG_STATE_HOME/swf-panda-workers "
        "(~/.local/state/swf-panda-workers)",
    )


class Monitor(_Section):
    """Heartbeats to swf-monitor, as the testbed's agents send them
    (swf_panda_workers.adapters.swf_monitor); off while ``url`` is unset."""

    url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="the monitor's base URL (heartbeats go to {url}/api/systemagents/heartbeat/)"
        "; SWF_MONITOR_URL; unset: no heartbeats",
    )
    token: SecretStr | None = Field(
        default=None,
        description="API token, sent as 'Authorization: Token <token>'; "
        "SWF_API_TOKEN or SWF_API_TOKEN_FILE",
    )
    interval: float = Field(
        default=60.0,
        gt=0,
        description="seconds between two heartbeats (a change of state is sent at once)",
    )
    timeout: float = Field(
        default=5.0,
        gt=0,
        description="seconds one heartbeat may take, the last one at shutdown included",
    )
    agent_type: str = Field(
        default="panda_workers",
        pattern=r"^[A-Za-z0-9_.-]{1,20}$",
        description="the monitor's agent_type (20 characters at most; some monitor versions "
        "accept only their own list: daqsim, data, processing, fastmon, ..., other)",
    )
    instance_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,100}$",
        description="this listener's name in the monitor; unset: "
        "panda-workers-<namespace>[-<replica>]-<hostname>",
    )

    @field_validator("url")
    @classmethod
    def _no_credentials_in_the_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        if "@" in urlsplit(url).netloc:
            # The URL is logged; the token has its own variable.
            raise ValueError("credentials in the URL; use SWF_API_TOKEN or SWF_API_TOKEN_FILE")
        return url.rstrip("/")

    @field_validator("token")
    @classmethod
    def _token_fits_a_header(cls, token: SecretStr | None) -> SecretStr | None:
        # HTTP libraries quote an unsendable header value in their errors.
        if token is not None and not re.fullmatch(r"[!-~]+", token.get_secret_value()):
            raise ValueError("holds a space, a control or a non-ASCII character")
        return token


class Metrics(_Section):
    """The listener's HTTP endpoint: Prometheus metrics on /metrics, its
    health on /healthz (listeners/status_server.py)."""

    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="address to listen on; 0.0.0.0 in a container",
    )
    port: int = Field(default=9640, ge=0, lt=65536, description="0: no endpoint")


class Settings(_Section):
    transceiver: Transceiver = Transceiver()
    brokers: Brokers = Brokers()
    panda: Panda = Panda()
    slice: Slice = Slice()
    scaling: Scaling = Scaling()
    timeouts: Timeouts = Timeouts()
    idds: Idds = Idds()
    prefect: Prefect = Prefect()
    monitor: Monitor = Monitor()
    metrics: Metrics = Metrics()
