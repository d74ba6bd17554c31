"""Offline tools: building, describing, evaluating, calibrating, distilling, benchmarking;
the demo, the embedded broker, sending events, DLQ replay. They may use the service
(`consumer.service`) and the tagging core; nothing there imports them."""
