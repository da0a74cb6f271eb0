"""splitfed from Python, for notebooks: the scenarios `splitfed run` runs, with the same settings,
checked by the same declarations, returning what `splitfed run ... --out` writes.

    import splitfed
    result = splitfed.run("fedavg", task="my_task.py", dataset="csv", data_dir="data/{party}", workers=3, rounds=5)
    result["accuracy"], result["history"]

Every role runs in this process over the in-memory transport, or over RabbitMQ with
broker="amqp://...". Errors are raised, not printed: a setting the scenario does not take or a
value its declaration refuses is a ValueError; a task or data set that cannot work is a TaskError
or DataError (splitfed.errors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from splitfed import config
from splitfed.roles.declaration import ProgressSink


def run(scenario: str, *, on_progress: ProgressSink | None = None, **settings: Any) -> dict:
    """Run `scenario` (centralized, split, splitnn, fedavg, p2p or smpl) to its end and return its
    results. `settings` are the command's options, named as its flags with underscores (task,
    workers, rounds, data_dir, broker, ...); `on_progress` gets every batch, epoch and round."""
    from splitfed.scenarios import launch
    from splitfed.scenarios.registry import SCENARIOS

    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    declared = SCENARIOS[scenario]
    values = settings_values(config.options(declared.learning, declared.run_settings), settings, scenario)
    learning = config.build(declared.learning, values)
    run_settings = config.build(declared.run_settings, values)
    result = launch.run(declared, learning, run_settings, on_progress)
    return json.loads(json.dumps(result))  # as --out writes it: plain JSON values


def settings_values(options: list[config.Option], settings: dict[str, Any], scenario: str) -> dict[str, Any]:
    """`settings` checked against the scenario's options: names, types, then each declaration's
    bounds and choices (config.build)."""
    by_name = {option.name: option for option in options}
    values = {}
    for name, value in settings.items():
        option = by_name.get(name)
        if option is None:
            raise ValueError(f"{scenario} takes no setting {name!r} (see splitfed run {scenario} --help)")
        values[name] = _typed(option, value)
    return values


def _typed(option: config.Option, value: Any) -> Any:
    if value is None or (option.type is Path and isinstance(value, (str, Path))):
        return Path(value) if value is not None else None
    if option.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not option.type:
        raise ValueError(f"{option.name}={value!r}: not {config.TYPE_NAMES[option.type]}")
    return value
