"""The models `--model` offers by name are the ones learning.models builds."""

from splitfed.learning import models
from splitfed.learning.settings import MODELS


def test_settings_list_every_model_that_is_built():
    assert tuple(models.BUILDERS) == MODELS
