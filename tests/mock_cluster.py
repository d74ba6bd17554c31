"""librdkafka's mock cluster, driven through ctypes on the librdkafka bundled in
confluent-kafka: a real Kafka protocol endpoint with fault injection."""

from __future__ import annotations

import ctypes
import glob
import os
from types import TracebackType

import confluent_kafka

# Kafka protocol API keys and error codes used by the tests
PRODUCE, OFFSET_COMMIT, HEARTBEAT = 0, 8, 12
ERR_NOT_ENOUGH_REPLICAS = 19
ERR_MSG_SIZE_TOO_LARGE = 10
ERR_REBALANCE_IN_PROGRESS = 27
ERR_COORDINATOR_NOT_AVAILABLE = 15
ERR_UNKNOWN_MEMBER_ID = 25


def _lib() -> ctypes.CDLL:
    libs = os.path.join(os.path.dirname(confluent_kafka.__file__), "..", "confluent_kafka.libs")
    found = sorted(glob.glob(os.path.join(libs, "librdkafka*.so*")))
    if not found:
        raise RuntimeError("no bundled librdkafka found next to confluent_kafka")
    lib = ctypes.CDLL(found[0])
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_conf_set.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
    lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
    lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_topic_create.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.rd_kafka_mock_broker_set_down.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.rd_kafka_mock_broker_set_up.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.rd_kafka_mock_partition_set_leader.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int32,
        ctypes.c_int32,
    ]
    lib.rd_kafka_mock_coordinator_set.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_int32,
    ]
    lib.rd_kafka_mock_cluster_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    return lib


class MockCluster:
    def __init__(self, brokers: int = 3) -> None:
        self.lib = _lib()
        conf = self.lib.rd_kafka_conf_new()
        err = ctypes.create_string_buffer(512)
        self.lib.rd_kafka_conf_set(conf, b"log_level", b"0", err, 512)
        self.rk = self.lib.rd_kafka_new(1, conf, err, 512)  # a consumer handle hosts it
        if not self.rk:
            raise RuntimeError(err.value.decode())
        self.mc = self.lib.rd_kafka_mock_cluster_new(self.rk, brokers)
        if not self.mc:
            raise RuntimeError("rd_kafka_mock_cluster_new failed")
        self.bootstrap = self.lib.rd_kafka_mock_cluster_bootstraps(self.mc).decode()

    def create_topic(self, name: str, partitions: int) -> None:
        rc = self.lib.rd_kafka_mock_topic_create(self.mc, name.encode(), partitions, 1)
        assert rc == 0, rc

    def create_topics(self, topics: dict[str, int]) -> None:
        for name, partitions in topics.items():
            self.create_topic(name, partitions)

    def push_request_errors(self, api_key: int, *errors: int) -> None:
        """The next len(errors) requests of `api_key` fail with these codes, in order."""
        self.lib.rd_kafka_mock_push_request_errors(
            ctypes.c_void_p(self.mc),
            ctypes.c_int16(api_key),
            ctypes.c_size_t(len(errors)),
            *[ctypes.c_int(e) for e in errors],
        )

    def set_leader(self, topic: str, partition: int, broker_id: int) -> None:
        rc = self.lib.rd_kafka_mock_partition_set_leader(
            self.mc, topic.encode(), partition, broker_id
        )
        assert rc == 0, rc

    def set_group_coordinator(self, group: str, broker_id: int) -> None:
        rc = self.lib.rd_kafka_mock_coordinator_set(self.mc, b"group", group.encode(), broker_id)
        assert rc == 0, rc

    def broker_down(self, broker_id: int) -> None:
        assert self.lib.rd_kafka_mock_broker_set_down(self.mc, broker_id) == 0

    def broker_up(self, broker_id: int) -> None:
        assert self.lib.rd_kafka_mock_broker_set_up(self.mc, broker_id) == 0

    def close(self) -> None:
        if self.mc:
            self.lib.rd_kafka_mock_cluster_destroy(self.mc)
            self.mc = None
        if self.rk:
            self.lib.rd_kafka_destroy(self.rk)
            self.rk = None

    def __enter__(self) -> MockCluster:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
