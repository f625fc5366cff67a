"""The lines that end a pre-training run (``make demo``'s last lines): what was trained,
on what, how to read the patch IoUs, and the config's reference figures beside the run's."""

import os
import re
import subprocess
import sys
import textwrap

from updetr_jax.configs import pretrain
from updetr_jax.tasks.pretrain import reading_guide

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IOU = dict(matched=0.41, group_top=0.25, group_top_wrong_patches=0.20, own_group=0.3125)


def test_demo_guide_says_what_was_trained_and_what_to_expect():
  lines = reading_guide(pretrain.get_config('demo'), IOU, 2000, 'held-out images')
  assert lines[0].startswith('UP-DETR pre-training: resnet_small CNN (random, frozen), 64-d')
  assert "trained 2000 steps of 8 images on 10 of scikit-image's photographs" in lines[0]
  assert lines[0].endswith('evaluated on query patches of held-out images.')
  assert lines[2] == (
    "This run, step 2000: matched 0.410, group_top 0.250, with other images' patches 0.200 "
    '(gap 0.050), own_group 0.31 (chance 0.25).'
  )
  expected = lines[3]
  assert expected.startswith('Expected (docs/results/demo.md, mean ± std over seeds ')
  for name, mean, std in pretrain.DEMO_REFERENCE['figures']:
    assert f'{name} {mean:.3f} ± {std:.3f}' in expected
  assert 'vary with the CPU' in lines[-1]
  assert not any(re.search('bit for bit', line) for line in lines)


def test_guide_of_a_release_run_names_its_cnn_and_data_and_has_no_reference():
  config = pretrain.get_config()
  config.init.backbone_checkpoint = 'swav_800ep_pretrain.pth.tar'
  lines = reading_guide(config, IOU, 300300, 'held-out images')
  assert 'resnet50 CNN (from swav_800ep_pretrain.pth.tar, frozen)' in lines[0]
  assert '100 queries, 10 query patches per image' in lines[0]
  assert 'trained 60 epochs of 256 images on TFDS imagenet2012:train' in lines[0]
  assert len(lines) == 3 and not any('Expected' in line for line in lines)


def test_reference_figures_are_the_ones_the_results_page_reports():
  with open(os.path.join(ROOT, pretrain.DEMO_REFERENCE['source'])) as f:
    page = f.read()
  for name, mean, std in pretrain.DEMO_REFERENCE['figures']:
    assert re.search(rf'{mean:.3f} ± {std:.3f}|{mean:.2f} ± {std:.2f}', page), (name, mean, std)
  assert f'seeds {pretrain.DEMO_REFERENCE["seeds"]}' in page


# updetr_jax.main with train.run replaced by one that returns a finished run's summary.
_FAKE_RUN = textwrap.dedent("""
    import runpy, sys
    from updetr_jax import train
    train.run = lambda config, workdir: {
      'task': 'pretrain', 'steps': 3, 'data_stats': {}, 'reading': ['first', 'last']}
    sys.argv = ['updetr_jax.main', *sys.argv[1:]]
    runpy.run_module('updetr_jax.main', run_name='__main__', alter_sys=True)
""")


def test_main_prints_the_guide_last(tmp_path):
  proc = subprocess.run(
    [sys.executable, '-c', _FAKE_RUN, '--config=configs/pretrain.py:demo', f'--workdir={tmp_path}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  lines = proc.stdout.strip().splitlines()
  assert lines[-2:] == ['first', 'last']
  assert "'steps': 3" in lines[-3] and 'reading' not in lines[-3]
