"""Gymnasium-style text environments, answer grading and task sources (installed as `alp_agents.envs`)."""
