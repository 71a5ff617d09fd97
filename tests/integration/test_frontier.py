"""The decoding families and the frontier's selection, on hand-made decodes and score tables."""

import numpy as np
import pytest

from nested_decode.data import mnist
from nested_decode.decoding import families
from nested_decode.decoding.families import Decode
from nested_decode.studies import frontier, study

FACTORS = (1, 2, 4, 8)


def test_every_one_width_decode_is_in_the_schedule_space_and_the_rest_is_magnets():
  space = set(families.schedule_space(FACTORS, 2, 12))
  one_width = families.one_width_decodes(FACTORS, 2, 12)
  fewer, alone = one_width[families.FEWER_STEPS], one_width[families.SUB_MODEL]
  assert {d.widths for d in fewer} == {((1, t),) for t in range(2, 13)}
  assert {d.widths for d in alone} == {((p, t),) for p in (2, 4, 8) for t in range(2, 13)}
  assert {d.cache for d in fewer + alone} == {'none', 'refresh_on_switch'}
  assert {d.widths for d in fewer + alone} <= space
  multi = {w for w in space if families.family_of(w) == families.MAGNETS}
  assert multi == space - {d.widths for d in fewer + alone}
  assert ((8, 1), (4, 1), (2, 6), (1, 4)) in multi and ((8, 3), (4, 3), (2, 3), (1, 3)) in multi
  for widths in space:
    factors = [p for p, _ in widths]
    assert factors == sorted(set(factors), reverse=True)  # narrowest first, each width once
    assert 2 <= sum(n for _, n in widths) <= 12 and all(n > 0 for _, n in widths)
  # compositions of T into k parts over the ordered subsets of the 4 factors, T = 2..12
  from math import comb
  assert len(space) == sum(comb(4, k) * comb(t - 1, k - 1)
                           for t in range(2, 13) for k in range(1, 5))


def test_families_are_named_by_their_widths():
  assert families.family_of(((1, 4),)) == families.FEWER_STEPS
  assert families.family_of(((2, 8),)) == families.SUB_MODEL
  assert families.family_of(((2, 4), (1, 2))) == families.MAGNETS
  assert Decode(((8, 1), (1, 3)), 'refresh_on_switch').name == '8x1-1x3_cached'
  assert Decode(((1, 4),), 'none').spec == '1x4'


def test_neighbours_move_add_or_remove_one_step_or_switch_the_cache():
  found = families.neighbours(Decode(((2, 1), (1, 3)), 'refresh_on_switch'), FACTORS, 2, 5)
  widths = {d.widths for d in found if d.cache == 'refresh_on_switch'}
  assert widths == {
      ((4, 1), (1, 3)), ((1, 4),), ((2, 2), (1, 2)),  # a step to the next narrower or wider
      ((8, 1), (2, 1), (1, 3)), ((4, 1), (2, 1), (1, 3)), ((2, 2), (1, 3)),  # a step added
      ((2, 1), (1, 4)),
      ((1, 3),), ((2, 1), (1, 2))}  # a step removed
  assert [d for d in found if d.cache == 'none'] == [Decode(((2, 1), (1, 3)), 'none')]
  space = set(families.schedule_space(FACTORS, 2, 5))
  assert all(d.widths in space for d in found)
  # at the step limits no step is added or removed
  at_max = families.neighbours(Decode(((1, 5),), 'none'), FACTORS, 2, 5)
  assert {sum(n for _, n in d.widths) for d in at_max} == {4, 5}
  at_min = families.neighbours(Decode(((1, 2),), 'none'), FACTORS, 2, 5)
  assert {sum(n for _, n in d.widths) for d in at_min} == {2, 3}


def test_a_schedule_out_of_order_is_an_error():
  with pytest.raises(ValueError, match='narrowest first'):
    families.counts_of(((1, 2), (8, 3)), (8, 4, 2, 1))


def row(family, flop_ratio, objective, name):
  return dict(family=family, flop_ratio=flop_ratio, objective=objective, name=name)


def test_selection_keeps_to_the_budget_and_the_family():
  rows = [row('fewer_steps', 3.4, 0.6, 'f4'), row('fewer_steps', 2.8, 0.4, 'f5'),
          row('magnets', 3.4, 0.3, 'm1'), row('magnets', 2.5, 0.1, 'm2'),
          row('magnets', 3.0, 0.3, 'm3'), row('sub_model', 12.8, 1.5, 's4')]
  assert frontier.best_within(rows, 3, 'fewer_steps')['name'] == 'f4'  # f5 is only 2.8x
  assert frontier.best_within(rows, 2, 'fewer_steps')['name'] == 'f5'
  assert frontier.best_within(rows, 3, 'magnets')['name'] == 'm1'  # tie with m3: the cheaper
  assert frontier.best_within(rows, 2, 'magnets')['name'] == 'm2'
  assert frontier.best_within(rows, 4, 'magnets') is None
  assert frontier.best_within(rows, 12, None)['name'] == 's4'
  assert frontier.best_within(rows, 13, None) is None


def test_the_pareto_front_is_the_undominated_points_in_either_direction():
  points = [dict(gflops=g, fd=f, name=n) for g, f, n in
            [(2.0, 60.0, 'a'), (1.0, 70.0, 'b'), (1.5, 75.0, 'c'), (3.0, 58.0, 'd'),
             (3.0, 57.0, 'e'), (0.5, 90.0, 'f'), (2.5, 61.0, 'g')]]
  assert [p['name'] for p in study.pareto_front(points, 'gflops', 'fd')] == ['f', 'b', 'a', 'e']
  accuracy = [dict(gflops=g, acc=a, name=n) for g, a, n in
              [(1.0, 0.9, 'a'), (2.0, 0.95, 'b'), (2.0, 0.97, 'c'), (3.0, 0.96, 'd')]]
  assert [p['name'] for p in study.pareto_front(accuracy, 'gflops', 'acc', lower_is_better=False)
          ] == ['a', 'c']


def test_verdict_needs_two_standard_errors():
  def diff(acc, acc_se, fd, fd_se):
    return dict(class_accuracy_diff=acc, class_accuracy_diff_se=acc_se, fd_diff=fd,
                fd_diff_se=fd_se)
  assert frontier.verdict(diff(0.0, 0.01, -3.0, 1.0)) == 'ahead'
  assert frontier.verdict(diff(0.0, 0.01, -1.5, 1.0)) == 'tie'
  assert frontier.verdict(diff(-0.03, 0.01, -3.0, 1.0)) == 'mixed'  # better fd, worse accuracy
  assert frontier.verdict(diff(0.0, 0.01, 2.5, 1.0)) == 'behind'
  assert frontier.verdict(diff(0.03, 0.01, 0.5, 1.0)) == 'ahead'


def test_paired_comparison_is_relative_to_the_baseline_fd():
  a = dict(fd_per_seed=[62.0, 64.0, 66.0])
  b = dict(fd_per_seed=[60.0, 61.0, 62.0])
  correct_a = np.array([[1, 1, 0, 1]] * 3, bool)
  correct_b = np.array([[1, 1, 1, 1]] * 3, bool)
  result = frontier.compare(a, correct_a, b, correct_b, baseline_fd=50.0)
  assert result['fd_diff'] == pytest.approx(3.0) and result['fd_gap'] == pytest.approx(0.06)
  assert result['fd_diff_se'] == pytest.approx(np.std([2, 3, 4], ddof=1) / np.sqrt(3))
  assert result['class_accuracy_diff'] == pytest.approx(-0.25)


def test_validation_digits_and_held_out_digits_share_no_example():
  """The frontier's validation reference is the first 1000 training digits
  (``study.make_scorer(..., reference_split='calibration')``); the test's are the held-out
  ones. They must be different examples, not just different positions."""
  from conftest import load_config

  from nested_decode.data.sources import all_images, data_sources
  train, evaluation, _, _ = data_sources(load_config('mnist'))
  validation, _ = all_images(train)
  validation = validation[:1000]
  held_out, _ = all_images(evaluation)
  assert len(validation) == 1000 and len(held_out) == 1000
  seen = {image.tobytes() for image in validation}
  assert not any(image.tobytes() in seen for image in held_out)
  rows = mnist.split_indices()
  assert not set(rows['train'][:1000].tolist()) & set(rows['eval'].tolist())
  images, _ = mnist.load_mnist('train')
  np.testing.assert_array_equal(images[:1000], validation)
