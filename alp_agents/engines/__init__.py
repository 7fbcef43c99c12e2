"""Inference engines: vLLM in-process and vLLM OpenAI-compatible servers over HTTP.

Both implement `InferenceEngine`: token ids in, sampled token ids with their log-probs out, and
weight updates into the running engine. See `base` for the contract.
"""

from alp_agents.engines.base import FinishReason, Generation, InferenceEngine, NamedTensors, SamplingConfig
from alp_agents.engines.openai_server import OpenAIServerEngine
from alp_agents.engines.server import VLLMServer, start_vllm_server
from alp_agents.engines.vllm_engine import VLLMEngine
from alp_agents.engines.weight_sync import WeightSyncExtension

__all__ = [
    "FinishReason",
    "Generation",
    "InferenceEngine",
    "NamedTensors",
    "OpenAIServerEngine",
    "SamplingConfig",
    "VLLMEngine",
    "VLLMServer",
    "WeightSyncExtension",
    "start_vllm_server",
]
