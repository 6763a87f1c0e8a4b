"""LLM Inference Workbench core: load a causal LM, apply techniques, measure latency, memory, accuracy."""

from workbench import deferred

__version__ = "0.1.0"

deferred.install()  # hqq, torchao and scipy, imported by transformers at start-up, wait until they are used
