"""Benchmarks of the agent against a local receiver: ``python -m bench [--smoke] [--out F]``."""
