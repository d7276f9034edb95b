"The seams hold: no import circle, no module over 450 lines, the environment read in one module, every declared kind loads."
import subprocess, sys
from importlib.metadata import entry_points

import pytest

from conftest import ROOT

LAYERS = ROOT.parent/'shared'/'tools'/'layers.py'


@pytest.mark.skipif(not LAYERS.exists(), reason='../shared/tools/layers.py is not beside the checkout')
def test_layers_point_one_way():
    r = subprocess.run([sys.executable, LAYERS, 'biovis'], cwd=ROOT, capture_output=True, text=True)
    out = r.stdout
    assert r.returncode == 0 and 'circles 0,' in out, out
    assert 'over 450 lines:' not in out and 'modules over 450 lines 0,' in out, out
    assert 'environment read outside core:' not in out and 'outside core 0' in out, out


def test_every_declared_kind_registers_itself():
    "Each `biovis.kinds` entry point imports a module that registers exactly the kind it is declared for."
    from biovis.kinds import kind_class
    eps = {ep.name: ep for ep in entry_points(group='biovis.kinds')}
    assert {'classification.fastai', 'classification.keras', 'classification.onnx', 'segmentation.fastai'} <= set(eps)
    for name in eps:
        task, backend = name.split('.')
        cls = kind_class(task, backend)
        assert (cls.task, cls.backend) == (task, backend), name


def test_serving_a_torch_model_imports_neither_training_nor_tensorflow():
    code = ("import sys, biovis.kinds, biovis.inference\n"
            "from biovis.kinds import kind_class\n"
            "kind_class('classification', 'fastai'); kind_class('segmentation', 'fastai')\n"
            "bad = [m for m in ('biovis.train', 'fastai.learner', 'tensorflow') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, '-W', 'ignore', '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
