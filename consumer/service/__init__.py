"""The running service: the confluent-kafka runtime (`runner`), the Faust runtime, health,
hot reload, start-up (`stack`, `serve`). Imports only `consumer.tagging` of this package."""
