"""Issue 18's rough edges a newcomer hits: the UI tables' headers before the first upload, a Grad-CAM panel one can read
(colour map, opacity slider, beside the image, enlarged), and a folder data set named after something meaningful.
The UI is checked on a real `biovis serve` on a loopback port, in headless Chromium."""
import io, os, socket, sqlite3, subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import BIOVIS, run_cli, wait_until_up, stop_process, spawn_cli

CHROMIUM = Path('/usr/bin/chromium')
ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking']


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def ui_server(trained, tmp_path_factory):
    "`biovis serve` on a free loopback port with the session's trained model; yields (url, home)."
    home, port = tmp_path_factory.mktemp('ui'), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith('BIOVIS_')}
    env.update(BIOVIS_HOME=str(home), BIOVIS_MODELS=str(trained[0].root), BIOVIS_RATE_LIMIT='0',
               GRADIO_ANALYTICS_ENABLED='False', BIOVIS_DB_URL=f'sqlite:///{home}/data/biovis.db')
    log = open(home/'server.log', 'w')
    proc = spawn_cli('serve', '--port', port, env=env, cwd=home, log=log)
    url = f'http://127.0.0.1:{port}'
    try:
        wait_until_up(proc, url + '/ping', home/'server.log')
        yield url, home
    finally: stop_process(proc, log)


@pytest.fixture
def page(ui_server):
    if not CHROMIUM.exists(): pytest.skip('chromium is not installed (apt-get install chromium)')
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        pg = b.new_page(viewport={'width': 1280, 'height': 1600})
        pg.goto(ui_server[0] + '/ui/', wait_until='load')
        pg.wait_for_selector('#upload input[type=file]', state='attached', timeout=60000)
        yield pg
        b.close()


def _headers(page):
    "The column headers of the Gradio Dataframe visible on the page (found by its table, not an id the old page lacked)."
    page.wait_for_selector('table thead th >> visible=true', timeout=30000)
    return [t.strip() for t in page.locator('table:visible thead th').all_inner_texts() if t.strip()]


def test_tables_show_their_headers_before_the_first_upload(page):
    "Rough edge: 'All uploaded images' showed headers 1 2 3 until something was classified; so did Batch and History."
    assert _headers(page) == ['id', 'file', 'predicted', 'p', 'set']
    page.get_by_role('tab', name='Batch').click()
    page.wait_for_timeout(500)
    assert _headers(page) == ['id', 'file', 'predicted', 'p', 'set']
    page.get_by_role('tab', name='History').click()
    page.wait_for_timeout(500)
    assert _headers(page) == ['id', 'time', 'file', 'predicted', 'model', 'feedback']


# the <img> of the image block labelled Grad-CAM (by its label, which the page had before this change too)
CAM_IMG = 'xpath=//*[@data-testid="block-label"][contains(., "Grad-CAM")]/ancestor::div[contains(@class, "block")][1]//img'


def _panel(page, base):
    "The Grad-CAM panel's pixels, as the browser got them, and the <img>'s size on screen."
    img = page.locator(CAM_IMG)
    src = img.get_attribute('src')
    data = page.request.get(src if src.startswith(('http', 'data:')) else base + src).body()
    box = img.bounding_box()
    return src, np.asarray(Image.open(io.BytesIO(data)).convert('RGB')), box


def test_gradcam_panel_colour_map_opacity_slider_and_size(page, ui_server, sample_ds, tmp_path):
    "Rough edge: the Grad-CAM overlay on a 28 px cell was hard to see. Now: the cell and its colour-mapped heat map side by side, enlarged by whole pixels to >= 256 px, and an opacity slider that redraws without predicting again."
    url, home = ui_server
    x, _ = sample_ds.tensors('test')
    cell = x[5]
    Image.fromarray(cell).save(tmp_path/'cell.png')
    page.locator('#upload input[type=file]').set_input_files(str(tmp_path/'cell.png'))
    page.wait_for_timeout(500)
    page.locator('#classify').click()
    page.wait_for_function("(document.querySelector('#info') || {}).innerText?.match(/prediction id [0-9a-f]{32}/)", timeout=60000)
    page.wait_for_selector(CAM_IMG, timeout=30000)
    page.wait_for_timeout(1000)                                   # the redraw at the slider's opacity follows the click
    src0, a, box = _panel(page, url)
    k = a.shape[0] // 28
    assert a.shape[0] >= 256 and a.shape[0] == 28 * k, a.shape    # whole-pixel enlargement to >= 256 px
    assert a.shape[1] > 2 * a.shape[0], a.shape                    # two panels side by side
    left, right = a[:, :a.shape[0]], a[:, -a.shape[0]:]
    assert (left == cell.repeat(k, 0).repeat(k, 1)).all()          # the cell itself, nearest neighbour
    assert np.abs(right.astype(int) - left).mean() > 10            # the heat map shows on the right
    assert box['height'] >= 256, box                               # and the page shows it at a readable size
    info = page.locator('#info').inner_text()
    with sqlite3.connect(home/'data'/'biovis.db') as c: n = c.execute('select count(*) from predictions').fetchone()[0]
    num = page.locator('#cam-alpha input[type=number]')
    num.fill('1'); num.press('Enter')
    page.wait_for_function("s => { const i = document.querySelector('#cam img'); return i && i.src !== s; }", arg=src0, timeout=30000)
    page.wait_for_timeout(500)
    _, b, _ = _panel(page, url)
    assert (b[:, :b.shape[0]] == left).all()                       # the cell is unchanged
    from biovis.inference import TURBO_LUT
    colours = {tuple(c) for c in TURBO_LUT.tolist()}
    rb = b[:, -b.shape[0]:].reshape(-1, 3)
    assert all(tuple(c) in colours for c in np.unique(rb, axis=0).tolist())   # opacity 1: the Turbo colour map alone
    assert len(np.unique(rb, axis=0)) > 3                          # and a map, not one colour
    with sqlite3.connect(home/'data'/'biovis.db') as c:
        assert c.execute('select count(*) from predictions').fetchone()[0] == n   # no new prediction
    assert page.locator('#info').inner_text() == info
    art = Path(__file__).resolve().parent.parent/'reports'/'test-artifacts'; art.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(art/'demo_gradcam_panel.png'), full_page=True)


@pytest.fixture
def bccd_like(sample_ds, tmp_path):
    "A few sample cells written as /tmp/.../bccd/images/<class>/<i>.png, the layout a newcomer brings."
    from biovis.data import export_folder
    ds = export_folder(sample_ds, tmp_path/'bccd'/'images', per_class=2)
    return ds


def test_folder_and_csv_data_sets_get_a_meaningful_name(bccd_like, sample_ds, tmp_path):
    "Rough edge: a folder data set was named after its folder, `images`; the user's name wins; .npz names stay."
    from biovis.data import load_dataset, from_npz, sample_path
    assert load_dataset(bccd_like).name == 'bccd'
    assert load_dataset(bccd_like/'train').name == 'bccd'          # images/train: two generic levels
    assert load_dataset(bccd_like, name='smears').name == 'smears'
    ds = load_dataset(bccd_like)
    rows = [dict(path=str(p), label=ds.classes[l]) for p, l in zip(ds.paths, ds.labels)]
    (tmp_path/'bccd'/'labels.csv').write_text(pd.DataFrame(rows).to_csv(index=False))
    assert load_dataset(tmp_path/'bccd'/'labels.csv').name == 'bccd'
    (tmp_path/'my_cells.csv').write_text(pd.DataFrame(rows).to_csv(index=False))
    assert load_dataset(tmp_path/'my_cells.csv').name == 'my_cells'
    assert load_dataset('sample').name == 'bloodmnist_sample'
    (tmp_path/'bloodmnist.npz').write_bytes(sample_path().read_bytes())
    assert from_npz(tmp_path/'bloodmnist.npz').name == 'bloodmnist'
    (tmp_path/'images'/'x').mkdir(parents=True)
    (tmp_path/'images'/'x'/'pathmnist.npz').write_bytes(sample_path().read_bytes())
    assert load_dataset(tmp_path/'images'/'x'/'pathmnist.npz').name == 'pathmnist'   # not renamed after a folder


def test_biovis_train_on_a_folder_names_the_model_after_the_data(bccd_like, tmp_path):
    "The newcomer's path: `biovis train --data /x/bccd/images` registers the model `bccd`, not `images`."
    r = run_cli('train', '--data', bccd_like, '--epochs', '1', '--quiet', home=tmp_path,
                env=dict(BIOVIS_MODELS=str(tmp_path/'models')), check=0)
    assert "ImageDataset('bccd'" in r.stdout and 'bccd v1' in r.stdout, r.stdout[-2000:]
    assert (tmp_path/'models'/'bccd').is_dir() and not (tmp_path/'models'/'images').exists()
