"""Distributed strategies: ZeRO data parallelism and pipeline parallelism."""
