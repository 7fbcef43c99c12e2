"""The package installs under one namespace and exports exactly what it documents."""

from __future__ import annotations

import subprocess
import sys

import alp_agents


def test_subpackages_import_under_the_alp_agents_namespace(tmp_path):
    # Run from an empty directory so the repository's own folders are not on sys.path.
    code = (
        "import importlib.util, alp_agents.envs, alp_agents.tools, alp_agents.trainers, alp_agents.engines\n"
        "print([importlib.util.find_spec(name) for name in ('envs', 'tools', 'trainers')])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[None, None, None]"


def test_all_is_sorted_and_complete():
    assert alp_agents.__all__ == sorted(alp_agents.__all__)
    for name in alp_agents.__all__:
        assert hasattr(alp_agents, name), name
    public = {name for name in vars(alp_agents) if not name.startswith("_") and name[0].isupper()}
    assert public <= set(alp_agents.__all__)


def test_errors_form_one_tree():
    for name in alp_agents.__all__:
        obj = getattr(alp_agents, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, alp_agents.AlpError), name
    assert issubclass(alp_agents.EngineTimeout, alp_agents.EngineError)


def test_readme_config_references_match_the_code():
    from pathlib import Path

    from alp_agents.config import config_reference
    from alp_agents.trainers.run_config import TrainConfig
    from alp_agents.trainers.sft import SFTConfig

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    for marker, config in (("config-reference", TrainConfig()), ("sft-reference", SFTConfig())):
        documented = readme.split(f"<!-- {marker}:start -->\n")[1].split(f"\n<!-- {marker}:end -->")[0]
        assert documented == config_reference(config), f"regenerate the README table with config_reference({type(config).__name__}())"


def test_readme_shows_the_tested_environment_examples():
    import re
    from pathlib import Path

    tests = Path(__file__).parent
    readme = (tests.parent / "README.md").read_text(encoding="utf-8")
    examples = re.findall(r"# --- README: [^\n]*\n(.*?)# --- end of README", (tests / "test_custom_env_example.py").read_text(), re.S)
    assert len(examples) == 3
    for example in examples:
        assert example.rstrip() in readme


def test_readme_run_configs_load():
    import re
    import tomllib
    from pathlib import Path

    from alp_agents.config import load_config_data
    from alp_agents.trainers.run_config import TrainConfig

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        load_config_data(TrainConfig, tomllib.loads(block), where="a README example")
