"""Perturbation, policy losses, advantages, log-probs, metrics and the update (installed as `alp_agents.trainers`)."""
