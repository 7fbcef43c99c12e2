"""Perturbation, policy losses, advantages, log-probs, metrics and the update (installed as `alp_agents.trainers`).

    from alp_agents.trainers import ALPTrainer, TrainerConfig
    trainer = ALPTrainer(model, TrainerConfig(algo="alp"))
    metrics = trainer.step(trajectories)
"""

from alp_agents.trainers.advantages import GroupAdvantages, grpo_advantages
from alp_agents.trainers.batching import Batch, collate
from alp_agents.trainers.logprobs import token_logprobs, token_logprobs_naive
from alp_agents.trainers.losses import LossDiagnostics, PolicyLossConfig, importance_weights, k3_kl, policy_loss
from alp_agents.trainers.perturbation import LayerPerturbation, find_decoder_layers
from alp_agents.trainers.trainer import ALPTrainer, LoRAConfig, TrainerConfig

__all__ = [
    "ALPTrainer",
    "Batch",
    "GroupAdvantages",
    "LayerPerturbation",
    "LoRAConfig",
    "LossDiagnostics",
    "PolicyLossConfig",
    "TrainerConfig",
    "collate",
    "find_decoder_layers",
    "grpo_advantages",
    "importance_weights",
    "k3_kl",
    "policy_loss",
    "token_logprobs",
    "token_logprobs_naive",
]
