"""What the service and the tools both use: the tagging core (decode, encode, gate, LLM),
events and their schemas, the LLM client, settings, metrics, dead letters. Imports nothing
from `consumer.service`, `consumer.tools` or `consumer.cli`."""
