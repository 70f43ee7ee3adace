"""Learning-rate range test on the FNC sample with a tiny network."""

import pytest

from ccflow.data import list_samples
from ccflow.lrfind import find_lr
from ccflow.train import TrainConfig
from tests.conftest import TINY_TRAINING

pytestmark = pytest.mark.timeout(300)


def test_lr_find_sweeps_and_chooses(fnc_sample_dir):
    config = TrainConfig(data=fnc_sample_dir, **TINY_TRAINING)
    samples = list_samples(fnc_sample_dir, require_masks=True)

    result = find_lr(config, samples, min_lr=1e-5, max_lr=1.0, steps=8)

    assert 1 <= len(result.lrs) <= 8
    assert result.lrs[0] == pytest.approx(1e-5)
    assert result.lrs == sorted(result.lrs)
    assert result.min_loss_lr in result.lrs
    assert result.chosen_lr == pytest.approx(max(result.min_loss_lr / 10, 1e-5))


def test_lr_find_rejects_bad_range(fnc_sample_dir):
    config = TrainConfig(data=fnc_sample_dir, **TINY_TRAINING)

    with pytest.raises(ValueError, match="learning-rate range"):
        find_lr(config, [], min_lr=1.0, max_lr=0.1)
