"""Callbacks: throughput and MFU, LoRA and QLoRA, benchmarks."""
