"""Service settings: every field is also an environment variable `TAGSTREAM_<FIELD>`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TAGSTREAM_", extra="ignore")

    bootstrap_servers: str = "127.0.0.1:9092"
    input_topic: str = "uploads"
    output_topic: str = "tags"
    group_id: str = "tagstream"
    tag_system: Path | None = None
    # poll the tag-system folder this often and switch to a new version between batches; 0: off
    reload_interval_s: float = Field(5.0, ge=0)
    model: str = "all-MiniLM-L6-v2"
    model_dir: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "none", "local" (start the bundled llama.cpp server) or an OpenAI-compatible base URL
    llm: str = "none"
    llm_model: str = "smollm2"
    # environment (or a file) only: a command-line argument would show in `ps`
    llm_api_key: SecretStr = SecretStr("")
    llm_api_key_file: Path | None = None  # e.g. a mounted secret; read when llm_api_key is empty
    llm_concurrency: int = Field(4, ge=1, le=256)
    llm_timeout_s: float = Field(30.0, gt=0)
    llm_max_tokens: int = Field(96, ge=8)
    llm_attempts: int = Field(3, ge=1, le=20)
    llm_rate_limit: float = Field(0.0, ge=0)  # requests/s per process; 0: no limit
    llm_breaker_failures: int = Field(5, ge=1)
    llm_breaker_reset_s: float = Field(30.0, gt=0)
    # when the LLM is unavailable: "review" (encoder tags, needs_review) or "pause" (pause the
    # partition, re-read from the item later, quix-streams style)
    llm_unavailable: Literal["review", "pause"] = "review"
    # a gate never fitted on labels or LLM decisions (zero-shot, the sample), or fitted but
    # short of its target precision: "llm" accepts nothing on its own (items go to the LLM,
    # or out as review); "trust" applies its thresholds anyway
    unfitted_gate: Literal["llm", "trust"] = "llm"
    # a share of auto-accepted items the LLM is asked about too: agreement per tag-system
    # version (tagstream_gate_agreement), and decision records a re-fit learns from
    audit_fraction: float = Field(0.0, ge=0.0, le=1.0)
    # the interest handbook (a file, or "sample"): per category, what users care about; its
    # section for an item's category guides the selective LLM (consumer/tagging/handbook.py)
    llm_handbook: str | None = None
    # the LLM extracts the item's facts (subject, entities, scene, intent) before choosing;
    # emit_extract puts them on the tag event too
    llm_extract: bool = False
    emit_extract: bool = False
    # selective: the LLM picks from the shortlist; generative: it proposes free tags that are
    # mapped onto the vocabulary (cosine >= generative_threshold), the rest are candidates
    llm_mode: Literal["selective", "generative"] = "selective"
    generative_threshold: float = Field(0.8, ge=0.0, le=1.0)
    new_tags_file: Path | None = None
    llm_pause_s: float = Field(5.0, gt=0)
    # pause mode: an item deferred this many times goes out as review (a partition never
    # stalls for good on one item); with the backoff (5 s doubling to 300 s) about 15 min
    llm_max_deferrals: int = Field(8, ge=0)
    # SIGTERM: finish what was read (LLM answers, acknowledgements) within this, then commit
    # and exit; keep it inside the pod's terminationGracePeriodSeconds
    shutdown_timeout_s: float = Field(120.0, gt=0)
    # the image path (off unless image_model is set): an exported CLIP-style pair (a folder,
    # or a name under model_dir) scores cover_url / frame_urls / cover_b64 against the tags
    image_model: str | None = None
    # where images may be fetched from: hostnames, *.domain, IPs, CIDRs; nothing by default.
    # A private, loopback or link-local address must be listed by IP or CIDR itself
    image_hosts: str = ""
    image_schemes: str = "https"
    image_max_frames: int = Field(4, ge=1, le=16)  # images per item, the cover first
    image_max_bytes: int = Field(5_000_000, ge=1024)
    image_max_pixels: int = Field(40_000_000, ge=1024)  # the decompression-bomb limit
    image_connect_timeout_s: float = Field(2.0, gt=0)
    image_read_timeout_s: float = Field(5.0, gt=0)  # one fetch's whole budget, redirects too
    image_concurrency: int = Field(8, ge=1, le=256)
    # a multimodal endpoint: the LLM gets the image URLs too (it fetches them itself)
    llm_images: bool = False
    batch_size: int = Field(64, ge=1, le=4096)
    batch_timeout_s: float = Field(0.05, ge=0)
    # encoder batches are cut by padded tokens too (length-sorted), TEI style; 0: by device
    # (512 on CPU, where padding costs most; 16384 on CUDA)
    max_batch_tokens: int = Field(0, ge=0)
    # read, decode and tokenize the next batch while the encode thread runs this one; and
    # produce LLM items when their answers arrive instead of holding the batch for them
    pipeline: bool = True
    # LLM items awaiting answers across batches before the loop waits for the oldest
    llm_max_pending: int = Field(256, ge=1)
    max_field_chars: int = Field(2000, ge=16)
    max_event_bytes: int = Field(1 << 20, ge=64)
    emit_embedding: bool = False
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(9108, ge=0, le=65535)
    session_timeout_ms: int = Field(10000, ge=1000)
    max_poll_interval_ms: int = Field(300000, ge=10000)
    ce_source: str = "tagstream"
    dlq_topic: str | None = None  # default: <input_topic>.dlq
    decisions_topic: str | None = None  # LLM decisions for `tagstream distill`; None: off
    check_topics: bool = True
    runtime: Literal["kafka", "faust"] = "kafka"
    security_protocol: str | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None

    @model_validator(mode="after")
    def _key_from_file(self) -> Settings:
        """TAGSTREAM_LLM_API_KEY_FILE: the key from a file (a mounted secret), stripped."""
        if self.llm_api_key_file is not None and not self.llm_api_key.get_secret_value():
            try:
                key = self.llm_api_key_file.read_text().strip()
            except OSError as e:
                raise ValueError(f"cannot read llm_api_key_file: {e}") from None
            self.llm_api_key = SecretStr(key)
        return self

    @property
    def dlq(self) -> str:
        return self.dlq_topic or f"{self.input_topic}.dlq"

    def kafka_common(self) -> dict[str, Any]:
        """librdkafka settings shared by consumer and producer; secrets revealed only here."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        if self.security_protocol:
            conf["security.protocol"] = self.security_protocol
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        return conf
