"""The added mask token's embedding: the mean of the old rows plus noise of scale ``init_noise_std``.

``test_model.py`` checks that the row sits at the mean without noise and moves off it with noise;
here the size of the move is checked: Gaussian noise of std ``s`` in ``d`` dimensions puts the row
at a distance of about ``s * sqrt(d)`` from the mean (a chi distribution with ``d`` degrees of
freedom, tightly concentrated), so a noise scaled wrongly (x1000, or not at all) fails.
"""

import math

import pytest
import torch

from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig
from tests.conftest import FAMILIES
from tests.test_model import _Tok


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("std", [0.02, 0.5])
def test_mask_row_noise_has_the_configured_scale(family, std):
    config = dict(FAMILIES[family])
    torch.manual_seed(0)
    net = DiffusionModel.from_config(
        BackboneConfig(config=config, mask_token=MaskTokenConfig(mode="add", init_noise_std=std)), _Tok(97))
    weight = net.model.get_input_embeddings().weight.detach().float()
    mask = net.mask_token_id
    assert mask == 97 and weight.shape[0] == 98
    hidden = weight.shape[1]
    distance = float((weight[mask] - weight[:mask].mean(0)).norm())
    expected = std * math.sqrt(hidden)
    assert expected / 3 < distance < expected * 3, (distance, expected)
    # per coordinate: the noise's empirical std is the configured one (within a factor of 2)
    spread = float((weight[mask] - weight[:mask].mean(0)).std())
    assert std / 2 < spread < std * 2, (spread, std)
