"""Secrets stay secret; content cannot steer the tags (see also test_core's injection test)."""

from __future__ import annotations

import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from consumer.tagging.config import Settings
from consumer.tagging.llm import SelectiveTagger
from consumer.tagging.metrics import Metrics
from consumer.tools.broker import free_port
from tests.conftest import FakeOpenAI, Reply, Responder
from tests.kafka_helpers import KafkaKit, make_events

SECRET = "sk-test-0123456789-SECRET"


def _echo_auth(req: dict[str, Any]) -> Reply:
    # a hostile or careless endpoint that echoes what it got back in the error
    return 401, {"error": {"message": f"bad key {SECRET}"}}


def test_a_key_echoed_by_the_endpoint_is_redacted(
    fake_llm: Callable[[Responder], FakeOpenAI], metrics: Metrics
) -> None:
    server = fake_llm(_echo_auth)
    t = SelectiveTagger(server.base_url, "m", SecretStr(SECRET), metrics=metrics, attempts=1)
    ans = t.tag({"title": "x"}, ["a", "b"], 2)
    assert (
        ans.status == "refused" and SECRET not in (ans.error or "") and "***" in (ans.error or "")
    )


def test_kafka_security_settings_pass_through_and_stay_hidden() -> None:
    s = Settings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc",
        sasl_password=SecretStr("pw-XYZ"),
    )
    conf = s.kafka_common()
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "svc" and conf["sasl.password"] == "pw-XYZ"
    assert "pw-XYZ" not in repr(s) and "pw-XYZ" not in s.model_dump_json()


@pytest.mark.broker
def test_the_llm_key_never_reaches_logs_or_metrics(
    kafka: KafkaKit,
    model_dir: Path,
    tmp_path: Path,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    server = fake_llm(_echo_auth)
    kafka.topics(1)
    kafka.send(make_events(36))
    port = free_port()
    env = {"TAGSTREAM_LLM_API_KEY": SECRET, "TAGSTREAM_LOG_LEVEL": "debug"}
    log = tmp_path / "run.log"
    args = ["--llm", server.base_url, "--metrics-port", str(port), "--llm-attempts", "1"]
    proc = kafka.spawn(model_dir, log, *args, env=env)
    try:
        kafka.read("tags", expect=36, timeout_s=90)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics_text = r.read().decode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert server.requests, "the LLM was never asked"
    assert "llm_answer_unusable" in text  # the 401s were logged ...
    assert SECRET not in text  # ... without the key
    assert SECRET not in metrics_text
    assert 'tagstream_llm_requests_total{status="error"}' in metrics_text
