"""Inference engines: vLLM in-process and vLLM OpenAI-compatible servers over HTTP."""
