"""Deployment files: they parse, the chart renders, the Dockerfile follows our rules, and every
metric the dashboard and the alerts use exists in the service's registry."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from consumer.tagging.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "tagstream"
METRIC_RE = re.compile(r"\b((?:tagstream|process|python)_[a-z0-9_]+)\b")


SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
    "gauge": ("",),
    "info": ("_info",),
}


def _registry_names() -> set[str]:
    """Every series name the service can expose, children or not yet."""
    r = CollectorRegistry()
    Metrics(r)
    names: set[str] = set()
    for m in r.collect():
        names.update(m.name + suffix for suffix in SUFFIXES.get(m.type, ("",)))
        names.update(s.name for s in m.samples)
    return names


def _exprs_of_dashboard() -> list[str]:
    dash = json.loads((ROOT / "deploy" / "grafana" / "tagstream-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def _exprs_of_alerts() -> list[str]:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_metric_used_exists(source: str) -> None:
    exprs = _exprs_of_dashboard() if source == "dashboard" else _exprs_of_alerts()
    assert exprs
    known = _registry_names()
    used = {name for e in exprs for name in METRIC_RE.findall(e)}
    assert used, "no metric names found"
    missing = sorted(used - known)
    assert not missing, f"{source} uses metrics the service does not expose: {missing}"


def test_dashboard_covers_what_operators_read() -> None:
    text = " ".join(_exprs_of_dashboard())
    for needed in (
        "tagstream_events_consumed_total",
        "tagstream_events_produced_total",
        "tagstream_consumer_lag_messages",
        "tagstream_stage_duration_seconds_bucket",
        "tagstream_llm_tokens_total",
        "tagstream_llm_routed_total",
        "tagstream_dlq_events_total",
        "tagstream_batch_size",
        "tagstream_end_to_end_seconds_bucket",
        "process_cpu_seconds_total",
    ):
        assert needed in text, needed


def test_alert_rules_are_complete() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {
        "TagstreamLagGrowing",
        "TagstreamNoProgress",
        "TagstreamDeadLetters",
        "TagstreamLLMErrors",
    } <= set(alerts)
    ops = (ROOT / "docs" / "OPERATIONS.md").read_text()
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert name in ops, f"docs/OPERATIONS.md has no runbook entry for {name}"


def test_compose_and_prometheus_files_parse() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redpanda", "tagstream", "llm", "prometheus", "grafana"} <= set(services)
    env = services["tagstream"]["environment"]
    assert env["TAGSTREAM_LLM"].startswith("http://llm:")
    assert "stop_grace_period" in services["tagstream"]
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["tagstream:9108"]
    for mount in services["grafana"]["volumes"] + services["prometheus"]["volumes"]:
        src = mount.split(":")[0]
        assert (ROOT / "deploy" / "compose" / src).resolve().exists(), src


def test_dockerfile_rules() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage build expected"
    assert "cuda" in text and "cudnn" in text  # a CUDA runtime base for onnxruntime-gpu
    runtime = text.split("AS runtime", 1)[1].split("\nFROM ", 1)[0]
    assert re.search(r"^USER (?!root|0\b)\S+", runtime, re.M), "runtime must not run as root"
    assert 'ENTRYPOINT ["tagstream"]' in runtime and 'CMD ["run"]' in runtime  # exec form
    health = re.search(r"HEALTHCHECK .*?CMD (\[.*?\])\n", runtime, re.S)
    assert health and json.loads(health.group(1))[0].startswith("python")
    assert "curl" not in text and "wget" not in text
    assert "export-onnx" in text and "TAGSTREAM_MODEL_DIR=/models" in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".models"} <= set(ignore)


def _helm() -> str:
    helm = os.environ.get("HELM") or shutil.which("helm") or str(ROOT / ".tools" / "helm")
    if not Path(helm).is_file():
        pytest.skip("helm not installed: run `make tools` (make test does)")
    return helm


def _render(*sets: str) -> list[dict[str, Any]]:
    args = [_helm(), "template", "t", str(CHART)]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_chart_lints() -> None:
    out = subprocess.run([_helm(), "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_chart_renders_the_defaults() -> None:
    docs = {d["kind"]: d for d in _render()}
    assert {"Deployment", "ConfigMap", "Secret", "Service", "PodDisruptionBudget"} <= set(docs)
    assert "ScaledObject" not in docs and "ServiceMonitor" not in docs
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["args"] == ["run"]
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    cm = docs["ConfigMap"]["data"]
    assert cm["TAGSTREAM_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert not any("API_KEY" in k or "PASSWORD" in k for k in cm)  # secrets stay in the Secret
    # every variable the chart sets is one `tagstream run` reads, and parses as a setting
    import typer.main

    from consumer.cli import app
    from consumer.tagging.config import Settings

    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    known = {p.envvar for p in run.params if isinstance(p.envvar, str)}
    known |= {f"TAGSTREAM_{name.upper()}" for name in Settings.model_fields}
    assert set(cm) <= known, set(cm) - known
    env = {
        k[len("TAGSTREAM_") :].lower(): v
        for k, v in cm.items()
        if v != "" and k[len("TAGSTREAM_") :].lower() in Settings.model_fields
    }
    parsed = Settings.model_validate(env)
    assert parsed.pipeline is True and parsed.llm_max_pending == 256
    # the grace period covers the LLM's worst case: timeout x attempts + 60
    assert pod["terminationGracePeriodSeconds"] >= 30 * 3 + 60


def test_chart_grace_period_follows_the_llm_timeout() -> None:
    docs = {d["kind"]: d for d in _render("config.llmTimeoutS=120", "config.llmAttempts=4")}
    assert docs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 540


def test_chart_renders_keda_servicemonitor_and_cpu_only() -> None:
    docs = {
        d["kind"]: d
        for d in _render(
            "keda.enabled=true",
            "keda.maxReplicas=12",
            "metrics.serviceMonitor.enabled=true",
            "gpu.enabled=false",
            "existingSecret=my-secret",
            "config.groupId=g1",
        )
    }
    so = docs["ScaledObject"]
    trig = so["spec"]["triggers"][0]
    assert trig["type"] == "kafka" and trig["metadata"]["consumerGroup"] == "g1"
    assert trig["metadata"]["topic"] == "uploads" and so["spec"]["maxReplicaCount"] == 12
    assert "replicas" not in docs["Deployment"]["spec"]  # KEDA owns the replica count
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert "Secret" not in docs
    c = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert c["envFrom"][1]["secretRef"]["name"] == "my-secret"


def test_chart_schema_rejects_bad_values() -> None:
    out = subprocess.run(
        [_helm(), "template", "t", str(CHART), "--set", "config.llmUnavailable=maybe"],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "llmUnavailable" in out.stderr
