"""Distributed strategies: ZeRO data parallelism, tensor and sequence parallelism on one mesh, pipeline parallelism."""
