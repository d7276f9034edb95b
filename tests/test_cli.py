"The README's main job and the training commands, through the real `biovis` command."
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, SHARED_DATA


def test_quickstart_end_to_end(tmp_path):
    r = run_cli('quickstart', '--epochs', '3', '--quiet', '--no-serve', home=tmp_path, check=0, fresh=True)   # the newcomer's command, a new process
    out = r.stdout
    for step in ('[1/5]', '[2/5]', '[3/5]', '[4/5]', '[5/5]'): assert step in out
    assert 'promoted it to production' in out
    from biovis.registry import ModelRegistry
    reg = ModelRegistry(tmp_path/'models')
    assert reg.resolve('bloodmnist') == 'v1'
    meta = reg.metadata('bloodmnist')
    assert meta['metrics']['split'] == 'test' and 0 < meta['metrics']['accuracy'] <= 1
    reports = list((tmp_path/'reports'/'quickstart').glob('*/report.html'))
    assert len(reports) == 1
    html = reports[0].read_text()
    assert 'Confusion matrix' in html and 'plotly' in html.lower() and 'basophil' in html
    m = json.loads((reports[0].parent/'metrics.json').read_text())
    assert m['version'] == 'v1' and len(m['per_class']) == 8
    samples = sorted((reports[0].parent/'samples').glob('*.png'))
    assert len(samples) == 8
    # the registered model predicts the files the job wrote, through the CLI
    r = run_cli('predict', *samples[:2], '--json', home=tmp_path, check=0)
    assert [json.loads(l)['model'] for l in r.stdout.splitlines()] == ['bloodmnist', 'bloodmnist']
    # and can be evaluated again on the held-out split, with the same accuracy as recorded
    r = run_cli('evaluate', 'bloodmnist', '--data', 'sample', '--tta', '--json', tmp_path/'ev.json', home=tmp_path, check=0)
    assert abs(json.loads((tmp_path/'ev.json').read_text())['accuracy'] - meta['metrics']['accuracy']) < 1e-9


def test_class_folder_export_trains_with_the_same_commands(tmp_path, sample_ds):
    from biovis.data import export_folder
    export_folder(sample_ds, tmp_path/'folder', fmt='jpg', per_class=12)
    run_cli('train', '--data', tmp_path/'folder', '--name', 'foldered', '--epochs', '2', '--quiet', home=tmp_path, check=0)
    r = run_cli('evaluate', 'foldered', home=tmp_path, check=0)
    assert 'accuracy' in r.stdout and 'basophil' in r.stdout


def _bccd_crops(dest: Path, per_class: int = 40):
    "WBC / RBC / Platelets crops from the BCCD boxes, at their own sizes, as a class-folder data set."
    root = SHARED_DATA/'bccd'/'BCCD'
    counts = {}
    for xml in sorted((root/'Annotations').glob('*.xml')):
        t = ET.parse(xml).getroot()
        img = None
        for o in t.iter('object'):
            c = o.findtext('name').strip()
            if counts.get(c, 0) >= per_class: continue
            b = o.find('bndbox'); box = [int(float(b.findtext(k))) for k in ('xmin', 'ymin', 'xmax', 'ymax')]
            if box[2] - box[0] < 8 or box[3] - box[1] < 8: continue
            if img is None: img = Image.open(root/'JPEGImages'/(xml.stem + '.jpg')).convert('RGB')
            (dest/c).mkdir(parents=True, exist_ok=True)
            img.crop(box).save(dest/c/f'{xml.stem}_{counts.get(c, 0)}.jpg')
            counts[c] = counts.get(c, 0) + 1
        if counts and min(counts.values()) >= per_class and len(counts) == 3: break
    return counts


def test_bccd_crops_as_class_folders(tmp_path):
    if not (SHARED_DATA/'bccd').exists(): pytest.skip('BCCD not beside the project')
    counts = _bccd_crops(tmp_path/'bccd')
    assert set(counts) == {'RBC', 'WBC', 'Platelets'}
    r = run_cli('data', 'info', tmp_path/'bccd', home=tmp_path, check=0)
    assert 'Platelets' in r.stdout
    run_cli('train', '--data', tmp_path/'bccd', '--name', 'bccd', '--size', '32', '--epochs', '6', '--quiet',
            home=tmp_path, check=0)
    r = run_cli('evaluate', 'bccd', home=tmp_path, check=0)
    from biovis.registry import ModelRegistry
    meta = ModelRegistry(tmp_path/'models').metadata('bccd', 'latest')
    assert meta['input_size'] == [32, 32] and meta['classes'] == ['Platelets', 'RBC', 'WBC']
    assert meta['metrics']['accuracy'] > 0.5                      # chance is 1/3
    wbc = next((tmp_path/'bccd'/'WBC').iterdir())
    r = run_cli('predict', wbc, '--model', 'bccd', '--version', 'latest', home=tmp_path, check=0)
    assert 'bccd' in r.stdout


def test_usage_errors(tmp_path):
    assert run_cli(home=tmp_path).returncode == 2
    assert run_cli('train', '--epochs', 'many', home=tmp_path).returncode == 2
    assert run_cli('train', '--data', tmp_path/'missing', home=tmp_path).returncode == 4
    r = run_cli('--help', home=tmp_path, check=0)
    assert 'quickstart' in r.stdout


def test_every_option_has_help_and_arch_lists_its_choices(tmp_path):
    "Every option of every command says what it does; `--arch` lists the architectures of `biovis.models.ARCHS`."
    import argparse
    from biovis.cli import build_parser
    from biovis.models import ARCHS
    def actions(parser, path=()):
        for x in parser._actions:
            if isinstance(x, argparse._SubParsersAction):
                for name, sp in x.choices.items(): yield from actions(sp, path + (name,))
            elif not isinstance(x, (argparse._HelpAction, argparse._VersionAction)): yield path, x
    assert [(' '.join(c), x.option_strings or x.dest) for c, x in actions(build_parser()) if not x.help] == []
    out = ' '.join(run_cli('train', '--help', home=tmp_path, check=0).stdout.split())
    assert all(a in out for a in ARCHS), out
    for opt in ('--name', '--arch', '--epochs', '--lr', '--bs', '--size', '--seed'):
        assert f'{opt} ' in out
