"""A strategy's local recipe travels to the workers as one meta entry: every strategy's comes
back as it was sent, a field left out keeps its default, and a value no worker can train with
is refused as `value`."""

import dataclasses

import pytest

from splitfed.learning import strategies
from splitfed.learning.settings import STRATEGIES, FederatedSettings
from splitfed.protocol import Message, ProtocolError
from splitfed.roles.fedavg.common import MODEL, RECIPE
from splitfed.roles.fedavg.worker import received_recipe


def model_message(recipe: object) -> Message:
    return Message(MODEL, "", "", round=1, meta={RECIPE: recipe})


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_recipe_arrives_as_sent(name):
    recipe = strategies.from_settings(FederatedSettings(strategy=name)).recipe
    assert received_recipe(model_message(dataclasses.asdict(recipe))) == recipe


def test_left_out_fields_keep_their_defaults():
    assert received_recipe(Message(MODEL, "", "", round=1)) == strategies.LocalRecipe()
    assert received_recipe(model_message({"prox_mu": 1})) == strategies.LocalRecipe(prox_mu=1.0)


@pytest.mark.parametrize("fields", [
    {"prox_mu": -0.1}, {"prox_mu": float("inf")}, {"prox_mu": float("nan")}, {"prox_mu": True}, {"prox_mu": "0.1"},
    {"absent_scale": 1.5}, {"absent_scale": -1}, {"calibration_tau": -1.0}, {"calibration_tau": None},
    {"frozen_head": 1}, {"control_variates": "yes"},
])
def test_a_value_no_worker_can_train_with_is_refused(fields):
    with pytest.raises(ProtocolError) as refused:
        received_recipe(model_message(fields))
    assert refused.value.reason == "value" and refused.value.detail.startswith(next(iter(fields)))


def test_a_recipe_that_is_not_a_record_is_refused():
    with pytest.raises(ProtocolError, match="^value: recipe"):
        received_recipe(model_message([0.1]))
