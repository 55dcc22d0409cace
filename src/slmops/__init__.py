"""slmops: small language models from checkpoint to a registered, running, measured ONNX Runtime GenAI model."""

from slmops.plugin.hookspecs import hookimpl

__all__ = ["hookimpl"]
