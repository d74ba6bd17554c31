"""`python -m consumer.cli`."""

from consumer.cli import main

main()
