"""LLM Inference Workbench core: load a causal LM, apply techniques, measure latency, memory, accuracy."""

__version__ = "0.1.0"
