"""Training curves reach TensorBoard without TensorFlow, from local and ``gs://`` workdirs: the
scalars read back with TensorBoard's own event reader equal the JSON lines."""

import json
import os

import jax.numpy as jnp
import pytest
from tensorboard.backend.event_processing import event_accumulator

from nested_decode import io_utils
from nested_decode.training.metrics import MetricLogger


def log_two_writes(workdir: str) -> list[dict]:
  logger = MetricLogger(workdir, 'toy', total_steps=4, log=lambda line: None)
  for step in range(1, 5):
    logger.accumulate({'loss': jnp.float32(10.0 / step), 'accuracy': jnp.float32(step / 4)})
    if step % 2 == 0:
      logger.write(step)
  logger.close()
  path = io_utils.join(workdir, 'toy_metrics.jsonl')
  return [json.loads(line) for line in io_utils.read_text(path).splitlines()]


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  events = event_accumulator.EventAccumulator(logdir)
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
          for tag in events.Tags()['scalars']}


def assert_same_scalars(lines: list[dict], scalars: dict) -> None:
  assert set(scalars) == {'loss', 'accuracy', 'steps_per_second'}
  for tag, points in scalars.items():
    expected = [(line['step'], line[tag]) for line in lines if tag in line]
    assert [step for step, _ in points] == [step for step, _ in expected]
    assert [value for _, value in points] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_local_event_files_hold_the_logged_scalars(tmp_path):
  lines = log_two_writes(str(tmp_path))
  assert [line['step'] for line in lines] == [2, 4]
  assert lines[0]['loss'] == pytest.approx((10 + 5) / 2)
  assert_same_scalars(lines, read_scalars(str(tmp_path / 'tensorboard' / 'toy')))


def test_event_files_on_cloud_storage_hold_the_logged_scalars(gcs_bucket, tmp_path,
                                                               monkeypatch):
  workdir = f'{gcs_bucket}/tensorboard_run'
  uploads, write_bytes = [], io_utils.write_bytes
  def recording_write_bytes(path, data):
    if 'tfevents' in path:
      uploads.append(len(data))
    write_bytes(path, data)
  monkeypatch.setattr(io_utils, 'write_bytes', recording_write_bytes)
  lines = log_two_writes(workdir)
  assert uploads and len(set(uploads)) == len(uploads)  # no upload of an unchanged file
  logdir = io_utils.join(workdir, 'tensorboard', 'toy')
  import gcsfs
  names = gcsfs.GCSFileSystem(skip_instance_cache=True).ls(logdir)
  assert len(names) == 1 and os.path.basename(names[0]).startswith('events.out.tfevents.')
  local = tmp_path / 'toy'
  local.mkdir()
  (local / os.path.basename(names[0])).write_bytes(io_utils.read_bytes(f'gs://{names[0]}'))
  assert_same_scalars(lines, read_scalars(str(local)))
