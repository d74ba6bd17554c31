from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from consumer.cli import app
from consumer.tools.demo import run_demo, sample_events
from tagsys.errors import EXIT_CONFIG, TagstreamError

runner = CliRunner()


def test_every_command_has_help_and_env_vars() -> None:
    for cmd in ("run", "send", "demo", "export-onnx", "llm-serve"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    for var in (
        "TAGSTREAM_BOOTSTRAP_SERVERS",
        "TAGSTREAM_LLM",
        "TAGSTREAM_METRICS_PORT",
        "TAGSTREAM_TAG_SYSTEM",
        "TAGSTREAM_LLM_API_KEY",
    ):
        assert var in res.output


def test_the_readme_names_every_setting_of_run() -> None:
    """Each setting is a `run` option (its env var in the options table) or listed as
    environment only: the README may not promise an option the code lacks, nor hide one."""
    import inspect
    import re

    from consumer.cli.run import run
    from consumer.tagging.config import Settings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    flags = set(inspect.signature(run).parameters)
    for field in Settings.model_fields:
        var = f"TAGSTREAM_{field.upper()}"
        assert var in readme, f"{var} is not in the README"
    env_only = readme.split("Environment only:", 1)[1].split("## ", 1)[0]
    listed = set(re.findall(r"TAGSTREAM_([A-Z_]+)", env_only))
    assert {f.upper() for f in Settings.model_fields if f not in flags} <= listed
    assert not {f.lower() for f in listed} & flags, "an option listed as environment only"


def test_the_api_key_never_shows_in_help() -> None:
    res = runner.invoke(
        app, ["run", "--help"], env={"TAGSTREAM_LLM_API_KEY": "sk-very-secret", "COLUMNS": "200"}
    )
    assert "sk-very-secret" not in res.output


def test_settings_hide_secrets() -> None:
    from pydantic import SecretStr

    from consumer.tagging.config import Settings

    s = Settings(llm_api_key=SecretStr("sk-1"), sasl_password=SecretStr("pw-2"))
    dumped = repr(s) + str(s.model_dump())
    assert "sk-1" not in dumped and "pw-2" not in dumped
    assert s.kafka_common()["sasl.password"] == "pw-2"


@pytest.mark.broker
def test_demo_without_llm_tags_every_sample_event(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res = run_demo(llm="none", model_dir=model_dir)
    assert res.events_in == len(sample_events()) == res.events_out
    assert res.llm_calls == 0 and res.decisions.get("encoder", 0) > 0
    assert res.decisions.get("review", 0) > 0  # the sample has vague items too
    assert not list(tmp_path.glob("tagstream-demo-*"))  # nothing left behind


@pytest.mark.broker
def test_a_failed_demo_keeps_the_broker_log_and_says_where(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    con = Console(file=io.StringIO(), width=300)
    with pytest.raises(TagstreamError, match="tag events within"):
        run_demo(llm="none", model_dir=model_dir, timeout_s=0.01, console=con)
    (kept,) = tmp_path.glob("tagstream-demo-*/broker.log")
    assert "tansu" in kept.read_text()
    assert str(kept) in con.file.getvalue()  # type: ignore[attr-defined]


@pytest.mark.broker
def test_demo_cli_json_last_line(model_dir: Path) -> None:
    env = os.environ | {"TAGSTREAM_MODEL_DIR": str(model_dir)}
    out = subprocess.run(
        [sys.executable, "-m", "consumer.cli", "demo", "--json", "--llm", "none"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"events_in", "events_out", "llm_calls", "elapsed_s"} <= set(summary)
    assert summary["events_in"] == summary["events_out"] == len(sample_events())


@pytest.mark.broker
@pytest.mark.llm
def test_demo_with_the_local_llm(model_dir: Path) -> None:
    """The whole path with the real local LLM (SmolLM2 on llama.cpp)."""
    res = run_demo(llm="local", model_dir=model_dir)
    assert res.events_out == res.events_in
    assert res.llm_calls >= 1 and res.llm_status.get("ok", 0) >= 1
    llm_asked = [o for o in res.outputs if o["llm_asked"]]
    assert llm_asked and all(o["llm_model"] == "smollm2" for o in llm_asked)
    # whatever the small model said, every tag is from the vocabulary
    from tagsys import load_sample_tags

    names = {t.name for t in load_sample_tags()[0]}
    assert all(t["name"] in names for o in res.outputs for t in o["tags"])


@pytest.mark.llm
def test_demo_with_the_local_llm_extracting_facts(model_dir: Path) -> None:
    """--llm-extract end to end with the bundled model: every LLM-decided event carries a
    bounded extract (whatever a 135M model writes in it) and the schema accepts it."""
    import jsonschema

    from consumer.tagging.events import load_schema

    res = run_demo(llm="local", model_dir=model_dir, llm_extract=True)
    assert res.events_out == res.events_in and res.llm_status.get("ok", 0) >= 1
    decided = [o for o in res.outputs if o["decision"] == "llm"]
    assert decided and all(
        set(o["extract"]) == {"subject", "entities", "scene", "intent"} for o in decided
    )
    schema = load_schema("tag-event")
    for o in res.outputs:
        jsonschema.validate(o, schema)
    assert res.llm_tokens["prompt"] > 0 and res.llm_tokens["completion"] > 0


def test_import_tags_writes_a_loadable_tag_system(model_dir: Path, tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.json"
    vocab.write_text(
        json.dumps(
            {
                "name": "toy",
                "version": "7",
                "gate": {"top_k": 2, "accept_threshold": 0.5},
                "tags": [{"name": "dogs", "aliases": ["puppy"]}, {"id": "c", "name": "coffee"}],
            }
        )
    )
    res = runner.invoke(
        app,
        ["import-tags", str(vocab), "--out", str(tmp_path / "ts"), "--model-dir", str(model_dir)],
    )
    assert res.exit_code == 0, res.output
    from tagsys import TagSystem

    ts = TagSystem.load(tmp_path / "ts")
    assert ts.version_id.startswith("toy@7#") and ts.tag_ids == ["dogs", "c"]
    assert ts.encoder == "all-MiniLM-L6-v2" and ts.gate.top_k == 2
    assert ts.gate.lexical_stems  # a new tag system matches by stems
    assert "tag_template" not in ts.provenance
    # a template: recorded, and the vectors are those of "dogs (pets): puppy", not "dogs: puppy"
    res = runner.invoke(
        app,
        [
            "import-tags",
            str(vocab),
            "--out",
            str(tmp_path / "ts2"),
            "--model-dir",
            str(model_dir),
            "--tag-template",
            "{name} (pets)",
        ],
    )
    assert res.exit_code == 0, res.output
    ts2 = TagSystem.load(tmp_path / "ts2")
    assert ts2.provenance["tag_template"] == "{name} (pets)"
    from models_onnx import OnnxEncoder

    enc = OnnxEncoder("all-MiniLM-L6-v2", model_dir=model_dir, device="cpu").tag_encoder()
    want = enc.encode(["dogs (pets): puppy", "coffee (pets)"])
    assert np.allclose(
        ts2.embeddings, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5
    )
    assert not np.allclose(ts2.embeddings, ts.embeddings, atol=1e-3)


def test_import_tags_rejects_a_bad_file_with_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"tags": []')
    out = subprocess.run(
        [sys.executable, "-m", "consumer.cli", "import-tags", str(bad), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == EXIT_CONFIG and "cannot read vocabulary" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_service_refuses_a_local_model_it_cannot_serve() -> None:
    """`--llm local` serves the chat model; the base model would answer the JSON prompts with
    prose, so it is refused up front instead of starting SmolLM2 behind the user's back."""
    from prometheus_client import CollectorRegistry

    from consumer.service.stack import build_stack
    from consumer.tagging.config import Settings

    s = Settings(llm="local", llm_model="gemma3-270m")
    with (
        pytest.raises(TagstreamError, match="base model for build-tags"),
        build_stack(s, CollectorRegistry()),
    ):
        pass
