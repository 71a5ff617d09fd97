"""The ``Schedule`` type: its spec forms, its checks, its plan and its FLOPs."""

import ml_collections
import pytest

from nested_decode import config_lib
from nested_decode.decoding.plan import make_plan
from nested_decode.decoding.schedule import DecodeTask, Schedule, ScheduleError
from nested_decode.models.flops import decode_flops
from nested_decode.models.transformer import TransformerConfig

TASK = DecodeTask(seq_len=49, num_generated=49, nesting_factors=(1, 2, 4, 8),
                  mask_schedule='cosine', query_buckets=4)
MODEL = TransformerConfig(num_layers=2, width=64, num_heads=8, mlp_dim=256, codebook_size=32,
                          num_classes=10, seq_len=49, nesting_factors=(1, 2, 4, 8))


def test_every_spec_form_gives_the_same_schedule():
  even = ((8, 3), (4, 3), (2, 3), (1, 3))
  forms = ['8x3,4x3,2x3,1x3', ' 8x3, 4x3,2x3 ,1x3', even, [list(s) for s in even],
           config_lib.schedule(even), {'widths': even}, Schedule(even)]
  assert {Schedule.parse(form) for form in forms} == {Schedule(even)}
  assert Schedule(even).name == '8x3,4x3,2x3,1x3' and Schedule(even).num_steps == 12


def test_a_config_entry_keeps_its_cache_and_refresh_interval_and_cache_overrides_it():
  entry = config_lib.schedule(((2, 6), (1, 6)), cache='refresh_every_k', refresh_every=3)
  assert Schedule.parse(entry) == Schedule(((2, 6), (1, 6)), 'refresh_every_k', 3)
  assert Schedule.parse(entry, cache='none').cache == 'none'
  assert Schedule.baseline(12) == Schedule(((1, 12),), cache='none')
  without_interval = Schedule.parse({'widths': ((1, 12),), 'cache': 'refresh_every_k'})
  with pytest.raises(ScheduleError, match='refresh_every=None is invalid'):
    without_interval.check(TASK)


@pytest.mark.parametrize('spec,field,problem', [
    ('8x3,fast', 'widths', 'factor x steps'),
    ([(8, 3, 1)], 'widths', 'pairs'),
    ((), 'widths', 'pairs'),
])
def test_malformed_specs_are_named(spec, field, problem):
  with pytest.raises(ScheduleError, match=problem) as error:
    Schedule.parse(spec)
  assert error.value.field == field


@pytest.mark.parametrize('schedule,field,problem', [
    (Schedule(((3, 12),)), 'widths', r'factors \[3\] are not in'),
    (Schedule(((8, 0), (1, 12))), 'widths', 'positive number of steps'),
    (Schedule(((8, 40), (1, 10))), 'widths', 'its 50 steps are more than the 49 tokens'),
    (Schedule(((1, 12),), cache='sometimes'), 'cache', 'allowed values'),
    (Schedule(((1, 12),), cache='refresh_every_k', refresh_every=0), 'refresh_every',
     'positive integer'),
])
def test_what_the_model_cannot_decode_is_named(schedule, field, problem):
  with pytest.raises(ScheduleError, match=problem) as error:
    schedule.check(TASK)
  assert error.value.field == field
  assert str(error.value).startswith(f'{field}=')


def test_the_plan_and_flops_are_the_planner_and_counter_of_the_task():
  schedule = Schedule(((8, 3), (4, 3), (2, 3), (1, 3)))
  schedule.check(TASK)
  plan = schedule.plan(TASK)
  assert plan == make_plan(49, 49, schedule.widths, 'refresh_on_switch', 1, 'cosine', 4)
  assert schedule.step_flops(TASK, MODEL, guided=True) == decode_flops(MODEL, plan, True)
  assert sum(Schedule.baseline(12).step_flops(TASK, MODEL, False)) == 12 * decode_flops(
      MODEL, Schedule.baseline(1).plan(TASK), False)[0]


def test_config_errors_name_the_schedule_key():
  config = ml_collections.ConfigDict(config_lib.base_config(
      num_layers=1, width=64, num_heads=8, token_shape=(7, 7), codebook_size=32,
      num_classes=10, guidance_scale=0.0, batch_size=8).to_dict())
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.eval.schedules.fast.cache='often' is invalid"):
    config_lib.check_schedule(config, config_lib.schedule(((1, 3),), cache='often'),
                              'eval.schedules.fast')
