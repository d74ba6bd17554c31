"""The CLI's conventions: `--version`, exit codes that tell usage, configuration, outage and
crash apart, a one-line error for an unreachable broker, and no secret on the command line."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from consumer.cli import app
from consumer.service.runner import RepeatFilter
from consumer.tagging.config import Settings
from consumer.tagging.net import free_port
from tagsys.errors import (
    EXIT_CONFIG,
    EXIT_RUNTIME,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    RuntimeFailure,
    UnavailableError,
)
from tests.conftest import cli_exit

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"tagstream {version('tagstream')}"


def test_exit_codes_are_distinct(tmp_path: Path) -> None:
    assert len({EXIT_RUNTIME, EXIT_USAGE, EXIT_CONFIG, EXIT_UNAVAILABLE, 0}) == 5
    assert cli_exit(["run", "--no-such-option"]) == EXIT_USAGE
    missing = tmp_path / "nope.json"
    assert cli_exit(["import-tags", str(missing), "--out", str(tmp_path / "o")]) == EXIT_CONFIG
    # a subclass keeps its own code through the CLI's handler
    for err_cls, code in ((UnavailableError, EXIT_UNAVAILABLE), (RuntimeFailure, EXIT_RUNTIME)):
        with pytest.MonkeyPatch.context() as mp:

            def boom(*_a: object, _cls: type[Exception] = err_cls, **_k: object) -> None:
                raise _cls("boom")

            mp.setattr("consumer.service.serve.run_service", boom)
            assert cli_exit(["run"]) == code


def test_a_configuration_librdkafka_refuses_is_exit_3(model_dir: Path) -> None:
    env = {**os.environ, "TAGSTREAM_MODEL_DIR": str(model_dir)}
    env |= {"TAGSTREAM_SECURITY_PROTOCOL": "SASL_SSL", "TAGSTREAM_SASL_MECHANISM": "FOO"}
    cmd = [sys.executable, "-m", "consumer.cli", "run", "--metrics-port", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == EXIT_CONFIG, out.stderr[-2000:]
    assert "Unsupported SASL mechanism: FOO" in out.stderr and "Traceback" not in out.stderr


def test_an_unreachable_broker_is_one_line_and_exit_4(model_dir: Path, tmp_path: Path) -> None:
    """Not a traceback: the address, librdkafka's reason and the 'unavailable' code; and the
    connect failures librdkafka repeats are logged once, not at every retry."""
    port = free_port()  # nothing listens there
    env = {**os.environ, "TAGSTREAM_MODEL_DIR": str(model_dir)}
    cmd = [sys.executable, "-m", "consumer.cli", "run"]
    cmd += ["--bootstrap-servers", f"127.0.0.1:{port}", "--metrics-port", "0"]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert out.returncode == EXIT_UNAVAILABLE, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out.stderr[-2000:]
    assert f"cannot reach the brokers at 127.0.0.1:{port}" in errors[0]
    assert "Broker transport failure" in errors[0] or "Connection refused" in errors[0]
    assert "Traceback" not in out.stderr
    noise = out.stdout + out.stderr
    assert noise.count("Connection refused") <= 6, noise[-3000:]  # once per client, not per retry


def test_repeat_filter_lets_each_message_through_once_per_window() -> None:
    f = RepeatFilter(every_s=60)

    def rec(msg: str) -> logging.LogRecord:
        return logging.LogRecord("librdkafka", logging.ERROR, __file__, 1, msg, None, None)

    assert f.filter(rec("connect failed")) and f.filter(rec("other"))
    assert not f.filter(rec("connect failed"))
    assert RepeatFilter(every_s=0).filter(rec("x"))


def test_the_llm_key_is_not_a_command_line_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = runner.invoke(app, ["run", "--llm-api-key", "sk-1"])
    assert res.exit_code == EXIT_USAGE
    monkeypatch.delenv("TAGSTREAM_LLM_API_KEY", raising=False)
    key = tmp_path / "key"
    key.write_text("sk-from-file\n")
    monkeypatch.setenv("TAGSTREAM_LLM_API_KEY_FILE", str(key))
    assert Settings().llm_api_key.get_secret_value() == "sk-from-file"
    monkeypatch.setenv("TAGSTREAM_LLM_API_KEY", "sk-env")
    assert Settings().llm_api_key.get_secret_value() == "sk-env"  # the variable wins
    monkeypatch.delenv("TAGSTREAM_LLM_API_KEY")
    with pytest.raises(ValueError, match="llm_api_key_file"):
        Settings(llm_api_key_file=tmp_path / "missing")


def test_run_help_names_the_environment_only_settings() -> None:
    res = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "400"})
    text = set(re.findall(r"TAGSTREAM_[A-Z_]+", res.output))
    for var in (
        "TAGSTREAM_LLM_API_KEY",
        "TAGSTREAM_LLM_API_KEY_FILE",
        "TAGSTREAM_SASL_PASSWORD",
        "TAGSTREAM_SASL_MECHANISM",
        "TAGSTREAM_SECURITY_PROTOCOL",
        "TAGSTREAM_LLM_BREAKER_FAILURES",
        "TAGSTREAM_LLM_BREAKER_RESET_S",
        "TAGSTREAM_SHUTDOWN_TIMEOUT_S",
    ):
        assert var in text, var


def test_a_taken_metrics_port_is_one_line_and_exit_3(model_dir: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "TAGSTREAM_MODEL_DIR": str(model_dir)}
        cmd = [sys.executable, "-m", "consumer.cli", "run", "--metrics-port", str(port)]
        cmd += ["--bootstrap-servers", "127.0.0.1:1"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == EXIT_CONFIG, out.stderr[-2000:]
    assert f"cannot serve metrics on 0.0.0.0:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_unreadable_key_file_is_a_named_setting_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TAGSTREAM_LLM_API_KEY_FILE", str(tmp_path / "missing"))
    monkeypatch.delenv("TAGSTREAM_LLM_API_KEY", raising=False)
    assert cli_exit(["run"]) == EXIT_CONFIG
    said = " ".join(capsys.readouterr().err.split())
    assert "invalid setting: " in said and "cannot read llm_api_key_file" in said


def test_help_paragraphs_are_reflowed_not_cut_at_the_source_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Typer keeps a docstring's line breaks after its first paragraph; every command's help
    is one line per paragraph, so rich wraps it to the terminal."""
    from consumer.cli import handbook, prose

    assert prose("one\n  two\n\nthree\nfour") == "one two\n\nthree four"
    assert prose("\b\nkept\nas is") == "\b\nkept\nas is"
    commands = app.registered_commands + handbook.registered_commands
    assert len(commands) > 10
    for cmd in commands:
        assert cmd.help, cmd.name
        assert all("\n" not in p or p.startswith("\b") for p in cmd.help.split("\n\n")), cmd.name
    monkeypatch.setattr("typer.rich_utils.MAX_WIDTH", 200)
    wide = runner.invoke(app, ["distill", "--help"]).output
    assert "with that scorer (an oracle picking the items)" in wide
