"""Configs fail at load with the field's path, the nearest valid key, and the expected type."""

from __future__ import annotations

import pytest

from alp_agents import Config, ConfigError, load_config


class Optim(Config):
    lr: float = 1e-5
    """Learning rate."""
    betas: list[float] = [0.9, 0.999]


class Run(Config):
    name: str = "run"
    steps: int = 10
    trainer: Optim = Optim()


def test_toml_plus_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('name = "a"\n[trainer]\nlr = 3e-4\n')
    cfg = load_config(Run, path, ["trainer.lr=1e-6", "steps=20", "name=b", "trainer.betas=[0.8, 0.9]"])
    assert (cfg.name, cfg.steps, cfg.trainer.lr, cfg.trainer.betas) == ("b", 20, 1e-6, [0.8, 0.9])


def test_unknown_key_names_it_and_the_nearest_valid_one(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[trainer]\nrl = 3e-4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trainer\.rl'; did you mean 'trainer\.lr'\?"):
        load_config(Run, path)
    with pytest.raises(ConfigError, match=r"unknown key 'stesp'; did you mean 'steps'\?"):
        load_config(Run, overrides=["stesp=3"])


def test_wrong_type_names_the_field_and_expected_type():
    with pytest.raises(ConfigError, match=r"trainer\.lr: .*expected float, got 'fast'"):
        load_config(Run, overrides=["trainer.lr=fast"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(Run, overrides=["steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(Run, overrides=["name=x", "name.inner=1"])


def test_a_bad_override_is_blamed_on_the_override_not_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("steps = 3\n")
    with pytest.raises(ConfigError) as refused:
        load_config(Run, path, ["trainer.lr=fast", "steps=4"])
    assert str(refused.value) == "invalid config: trainer.lr: Input should be a valid number, unable to parse string as a number " \
                                 "(expected float, got 'fast') (from --set trainer.lr=fast)"
    path.write_text("stesp = 3\n")
    with pytest.raises(ConfigError) as refused:
        load_config(Run, path, ["trainer.rl=1"])
    head, *problems = str(refused.value).splitlines()
    assert head == f"invalid config in {path}:"  # the file has a bad key of its own
    assert sorted(problems) == ["  - unknown key 'stesp'; did you mean 'steps'?",
                                "  - unknown key 'trainer.rl'; did you mean 'trainer.lr'? (from --set trainer.rl=1)"]


def test_a_rule_across_sections_is_reported_by_its_message():
    from alp_agents.trainers.run_config import TrainConfig

    assert load_config(TrainConfig, overrides=["rollout.sampling.temperature=0.7"]).trainer.temperature == 0.7
    with pytest.raises(ConfigError, match=r"trainer\.temperature=1\.0 differs from rollout\.sampling\.temperature=0\.7"):
        load_config(TrainConfig, overrides=["rollout.sampling.temperature=0.7", "trainer.temperature=1.0"])


def test_the_turn_budget_is_the_environments_and_old_configs_move_theirs_there(tmp_path):
    from alp_agents.rollout import RolloutLimits
    from alp_agents.trainers.run_config import TrainConfig

    path = tmp_path / "old.toml"  # as runs saved it before the env owned the turn budget
    path.write_text('[env]\nkwargs = { system_prompt = "Go." }\n[rollout.limits]\nmax_turns = 2\nmax_tokens_per_turn = 40\n')
    cfg = load_config(TrainConfig, path)
    assert cfg.env.kwargs == {"system_prompt": "Go.", "max_turns": 2} and cfg.rollout.limits.max_tokens_per_turn == 40
    assert "max_turns" not in cfg.rollout.limits.model_dump()
    assert load_config(TrainConfig, path, ["env.kwargs.max_turns=2"]).env.kwargs["max_turns"] == 2  # the same budget twice is one
    with pytest.raises(ConfigError, match=r"rollout\.limits\.max_turns = 2 and env\.kwargs\.max_turns = 5: .*remove rollout\.limits\.max_turns"):
        load_config(TrainConfig, path, ["env.kwargs.max_turns=5"])
    with pytest.raises(ValueError, match=r"rollout\.limits\.max_turns was removed: the environment owns the turn budget; set it in env\.kwargs"):
        RolloutLimits(max_turns=3)


def test_a_section_given_in_part_keeps_the_values_its_default_sets(tmp_path):
    from alp_agents.trainers.run_config import TrainConfig

    default = TrainConfig()
    assert (default.trainer.lr, default.rollout.sampling.seed) == (1e-5, 0)  # a run's defaults, not the sections' own
    cfg = load_config(TrainConfig, overrides=["trainer.algo=bypass", "rollout.sampling.temperature=0.7"])
    assert (cfg.trainer.algo, cfg.trainer.lr) == ("bypass", 1e-5)
    assert (cfg.rollout.sampling.temperature, cfg.rollout.sampling.seed, cfg.trainer.temperature) == (0.7, 0, 0.7)
    path = tmp_path / "run.toml"
    path.write_text("[trainer]\nlr = 3e-4\n[rollout.sampling]\nseed = 5\n")
    cfg = load_config(TrainConfig, path)
    assert (cfg.trainer.lr, cfg.rollout.sampling.seed, cfg.rollout.sampling.temperature) == (3e-4, 5, 1.0)


def test_a_runs_turn_length_is_set_in_one_place():
    from alp_agents.trainers.run_config import TrainConfig

    with pytest.raises(ConfigError, match=r"rollout\.sampling\.max_tokens = 64 is not used in a run: .*from rollout\.limits\.max_tokens_per_turn .*; set that instead"):
        load_config(TrainConfig, overrides=["rollout.sampling.max_tokens=64"])
    assert load_config(TrainConfig, overrides=["rollout.limits.max_tokens_per_turn=64"]).rollout.limits.max_tokens_per_turn == 64
