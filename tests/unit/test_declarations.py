"""The contract between settings, CLI flags, SPLITFED_* variables, the launcher and the README:
derived from one declaration per role and scenario, checked here so that none can drift."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from splitfed import config, docs
from splitfed.cli import app
from splitfed.roles.registry import ROLES
from splitfed.scenarios import launch
from splitfed.scenarios.registry import SCENARIOS

README = Path(__file__).resolve().parents[2] / "README.md"


def command(group: str, name: str):
    return typer.main.get_command(app).commands[group].commands[name]


def flags_and_envs(cli_command) -> tuple[list[str], list[str]]:
    """Each option's flag (a boolean that is on by default also has its --no- form) and variable."""
    options = [p for p in cli_command.params if p.name != "help"]
    for p in options:
        assert p.secondary_opts == ([f"--no-{p.opts[0][2:]}"] if p.is_flag and p.default is True else []), p.name
    return [flag for p in options for flag in p.opts], [p.envvar for p in options]


@pytest.mark.parametrize("name", sorted(ROLES))
def test_every_role_setting_is_one_flag_and_one_variable(name):
    spec = ROLES[name]
    flags, envs = flags_and_envs(command("serve", name))
    fields = [option.name for option in spec.options()]
    assert len(flags) == len(set(flags)) == len(fields), "a settings field with no flag, or two"
    assert len(envs) == len(set(envs)) == len(fields)
    assert set(envs) == spec.env_names() == {config.env_name(field) for field in fields}
    assert set(flags) == {"--" + field.replace("_", "-") for field in fields}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_run_setting_is_one_flag_and_one_variable(name):
    scenario = SCENARIOS[name]
    flags, envs = flags_and_envs(command("run", name))
    fields = [option.name for option in config.options(scenario.learning, scenario.run_settings)]
    assert len(flags) == len(set(flags)) == len(fields)
    assert set(envs) == {config.env_name(field) for field in fields}


def plans(tmp_path):
    """Every scenario's launches, in the variants that change what is passed to the roles."""
    keys = tmp_path / "keys" / "key-list.json"
    variants = {  # scenario -> [(run settings, learning settings)]
        "split": [(dict(via="relay"), {}), (dict(via="direct", key_list=keys, save_model=tmp_path / "m.safetensors"), {})],
        "splitnn": [(dict(), dict(clients=3, schedule="splitfed-v1", min_clients=2)), (dict(key_list=keys), dict(clients=2, schedule="round-robin"))],
        "fedavg": [(dict(), {}), (dict(key_list=keys, checkpoint_dir=tmp_path / "ckpt", min_workers=2, round_timeout=5.0), {})],
        "p2p": [(dict(key_list=keys, peer_timeout=4.0), dict(peers=3, max_staleness=1))],
        "smpl": [(dict(), dict(peers=4, hyperedge_size=3, variety=2, epsilon=0.5, sparsity=0.9, local_parallel="hogwild", async_global=False))],
    }
    for name, changes in variants.items():
        scenario = SCENARIOS[name]
        for run_change, learning_change in changes:
            (tmp_path / "ca.pem").write_text("a CA file")
            run = scenario.run_settings(broker="amqps://u:p@broker:5671/", tls_ca=tmp_path / "ca.pem", **run_change).resolved()
            yield name, scenario.plan(scenario.learning(dataset="digits", seed=7, lr=0.01, **learning_change), run, tmp_path)


def test_every_variable_a_scenario_passes_is_accepted_by_its_role_and_means_the_same(tmp_path):
    from splitfed.transport import Connection

    seen = set()
    for name, launches in plans(tmp_path):
        for role in launches:
            spec = ROLES[role.spec.name]
            passed = {key: value for key, value in launch.role_environment(role, Connection(broker="amqps://u:p@broker:5671/", tls_ca=tmp_path / "ca.pem")).items() if key.startswith("SPLITFED_")}
            assert set(passed) <= spec.env_names(), f"{name}: serve {spec.name} has no option for {set(passed) - spec.env_names()}"
            # Read back as `serve` reads them: the role gets exactly the settings it was planned with.
            values = {option.name: option.parse(passed[option.env]) for option in spec.options() if option.env in passed}
            if spec.learning:
                assert config.build(spec.learning, values) == role.learning
            assert config.build(spec.deployment, values) == role.deployment
            seen.add(spec.name)
    assert seen == set(ROLES), "a role no scenario starts"


def test_role_processes_get_their_threads_and_a_short_openmp_spin_unless_the_user_chose_one(tmp_path, monkeypatch):
    from splitfed.transport import Connection

    _, launches = next(plans(tmp_path))
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = launch.role_environment(launches[0], Connection())
    assert env["OMP_NUM_THREADS"] == str(launches[0].threads) and env["GOMP_SPINCOUNT"] == str(launch.IDLE_SPINS)
    monkeypatch.setenv("GOMP_SPINCOUNT", "500")
    assert launch.role_environment(launches[0], Connection())["GOMP_SPINCOUNT"] == "500"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # an explicit spin count would override it
    assert "GOMP_SPINCOUNT" not in launch.role_environment(launches[0], Connection())


def test_unknown_variables_are_reported_by_name():
    env = {**os.environ, "SPLITFED_ROUNDS": "3", "SPLITFED_SESION": "typo"}
    completed = subprocess.run(
        [sys.executable, "-m", "splitfed", "serve", "relay", "--session", "s", "--broker", "memory"], env=env, capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 2 and "needs --broker amqp" in completed.stderr
    for name in ("SPLITFED_ROUNDS", "SPLITFED_SESION"):
        assert f"{name} is set, but serve relay has no such option" in completed.stderr


def test_bad_values_are_refused_with_the_flag_named():
    option = next(o for o in ROLES["fedavg-server"].options() if o.name == "lr")
    for text in ("nan", "inf", "-1", "fast"):
        with pytest.raises(ValueError, match="SPLITFED_LR|--lr"):
            option.parse(text)
    assert option.parse("0.5") == 0.5


def test_the_readme_option_table_is_the_generated_one():
    text = README.read_text()
    start, end = text.index(docs.BEGIN), text.index(docs.END) + len(docs.END)
    assert text[start:end] == docs.options_table(), "README options are stale: run ci/update_readme_options.sh"


@pytest.mark.parametrize("name", sorted(ROLES))
def test_every_declared_metric_follows_the_scheme_and_is_documented(name):
    readme = README.read_text()
    for metric in ROLES[name].metrics:
        assert metric._name.startswith("splitfed_") and metric._labelnames[:2] == ("role", "session"), metric._name
        assert metric._name in readme, f"{metric._name} is not in the README's metrics list"


# -- how each role is deployed: declared once (RoleSpec), the same everywhere ----------------------

CONTAINERFILE = README.parent / "images" / "Containerfile"
IMAGES_SCRIPT = README.parent / "ci" / "images.sh"
CHART_SCHEMA = README.parent / "ci" / "chart_schema.py"


def containerfile_roles() -> dict[str, tuple[str, list[str]]]:
    """Each role stanza of images/Containerfile: target -> (the stage it is built from, its entrypoint)."""
    stanzas = re.findall(r"^FROM (\S+) AS (\S+)\nENTRYPOINT (\[.*\])$", CONTAINERFILE.read_text(), re.M)
    return {target: (base, json.loads(entrypoint)) for base, target, entrypoint in stanzas}


def images_script_targets() -> list[str]:
    """The targets ci/images.sh builds, in order."""
    (targets,) = re.findall(r"^CPU_TARGETS=\(([^)]*)\)$", IMAGES_SCRIPT.read_text(), re.M)
    return targets.split()


def test_reading_the_data_set_means_being_told_its_name():
    for name, spec in ROLES.items():
        assert spec.names_data or not spec.reads_data, name
        assert spec.families and spec.values_key and spec.image, f"{name}: declare its families, values key and image"


def test_everything_deployed_agrees_with_the_declarations():
    """sizing, the launcher's values, the chart's generated schema and files/roles.json, and the
    images (Containerfile stanzas, ci/images.sh's targets) all say what the declarations say."""
    from splitfed import sizing
    from splitfed.cluster import values
    from splitfed.roles.registry import FAMILIES

    assert sizing.ROLE_NAMES == tuple(ROLES)
    assert set(sizing.GPU_ROLES) == {name for name, spec in ROLES.items() if spec.torch}
    assert values.ROLE_KEYS == {name: spec.values_key for name, spec in ROLES.items()}
    assert {family: set(roles) for family, roles in values.FAMILIES.items()} == \
        {family: {name for name in roles if ROLES[name].learning} for family, roles in FAMILIES.items()}
    checked = subprocess.run([sys.executable, str(CHART_SCHEMA), "--check"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    base = {name: "torch" if spec.torch else "core" for name, spec in ROLES.items()}
    assert containerfile_roles() == {spec.image: (base[name], ["splitfed", "serve", name]) for name, spec in ROLES.items()}
    core, torch = ([spec.image for spec in ROLES.values() if spec.torch == needs_torch] for needs_torch in (False, True))
    assert images_script_targets() == ["core", *core, "torch", *torch]
