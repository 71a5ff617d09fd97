"""--mode=recipe_study's variants and its paired comparison (the study itself runs on the main
job's model: docs/results.md)."""

import math

import pytest
from conftest import load_config

from nested_decode import config_lib
from nested_decode.inference import restore
from nested_decode.studies import recipe_study


def test_each_variant_changes_only_its_settings_and_the_seed():
  config = load_config('mnist')
  for name, variant in recipe_study.VARIANTS.items():
    own = recipe_study.variant_config(config, name, seed=2)
    trained = recipe_study.training_config(config, variant.training, seed=2)
    for c in (own, trained):
      config_lib.validate(c)
      assert c.seed == 2 and c.training.num_steps == config.training.num_steps
      assert c.model.dropout_rate == c.model.attention_dropout_rate == variant.dropout_rate
    assert own.training.ema_decay == (0.999 if variant.weights == restore.EMA else 0.0)
    assert trained.training.ema_decay == 0.999  # every training keeps the average
  assert recipe_study.VARIANTS['ema'].training == recipe_study.VARIANTS['plain'].training
  assert config.seed == 0 and config.training.ema_decay == 0.0  # the job's config is untouched
  with pytest.raises(ValueError, match="'swa'"):
    recipe_study.variant_config(config, 'swa', 0)


def test_differences_are_paired_by_training_seed():
  results = {
      'plain': dict(step_seconds=0.10, rows=[dict(class_accuracy=a, fd=f) for a, f in
                                             ((0.90, 50.0), (0.80, 60.0), (0.85, 55.0))]),
      'ema': dict(step_seconds=0.11, rows=[dict(class_accuracy=a, fd=f) for a, f in
                                           ((0.92, 48.0), (0.81, 59.0), (0.88, 53.0))]),
  }
  row = recipe_study.summary('ema', results)
  assert row['class_accuracy_diff'] == pytest.approx(0.02)
  # per-seed differences 0.02, 0.01, 0.03: their sample sd is 0.01, over sqrt(3) pairs
  assert row['class_accuracy_diff_se'] == pytest.approx(0.01 / math.sqrt(3))
  assert row['fd_diff'] == pytest.approx(-5 / 3)
  assert row['step_time_over_plain'] == pytest.approx(1.1)
  assert row['weights'] == restore.EMA and row['settings']['ema_decay'] == 0.999
  assert '| ema | 0.8700 |' in recipe_study.markdown(dict(
      variants=[row], seeds=3, num_samples=10, reference='r', training_steps=8, ema_decay=0.999))
