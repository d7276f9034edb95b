"The documentation site (issue 18): `biovis docs` builds it offline from the notebooks, and its figures render."
import json, shutil, time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

CHROMIUM = Path('/usr/bin/chromium')
ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking']
FIGURE_PAGES = ['04_evaluate.html', 'reports/benchmarks/classification.html', 'reports/benchmarks/drift.html']


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "The site, built once by the real command into a temporary folder (cold: its own execution cache)."
    d = tmp_path_factory.mktemp('docs')
    t = time.time()
    r = run_cli('docs', '--out', d/'html', '--cache', d/'cache', timeout=600, check=0)
    print(f'biovis docs: {time.time() - t:.0f} s; {r.stdout.strip()}')
    return d/'html'


def test_site_has_every_page(site):
    nbs = [p.stem for p in (ROOT/'nbs').glob('*.ipynb') if p.stem != 'index']
    missing = [n for n in nbs if not (site/f'{n}.html').exists()]
    assert not missing, f'notebooks without a page: {missing}'
    from biovis._modidx import d
    assert all((site/'api'/f'{m}.html').exists() for m in d['syms']), 'a module without an API page'
    assert all((site/'reports'/'benchmarks'/f'{m.stem}.html').exists() for m in (ROOT/'reports'/'benchmarks').glob('*.md'))
    api = (site/'api'/'biovis.evaluate.html').read_text()
    assert 'biovis.evaluate.evaluate' in api and 'plot_confusion' in api   # py: objects of the __all__ names
    index = (site/'index.html').read_text()
    assert 'href="04_evaluate.html"' in index and 'href="api/biovis.evaluate.html"' in index
    tutorials = sorted(p.stem for p in (ROOT/'nbs'/'tutorials').glob('*.ipynb'))
    assert tutorials and all((site/'tutorials'/f'{t}.html').exists() and f'href="tutorials/{t}.html"' in index for t in tutorials)
    assert 'cdn.plot.ly' not in (site/'04_evaluate.html').read_text() and (site/'_static'/'plotly.min.js').exists()


def test_figures_render_offline_in_chromium(site):
    if not CHROMIUM.exists(): pytest.skip('chromium is not installed (apt-get install chromium)')
    from playwright.sync_api import sync_playwright
    outside = []
    def only_local(route):
        if route.request.url.startswith('file://'): route.continue_()
        else: outside.append(route.request.url); route.abort()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            pg = b.new_page(); pg.route('**/*', only_local)
            for page in FIGURE_PAGES:
                pg.goto((site/page).as_uri())
                pg.wait_for_selector('.plotly-graph-div svg.main-svg', timeout=20_000)
                n = pg.evaluate("document.querySelectorAll('.plotly-graph-div svg.main-svg').length")
                assert n >= 1, f'{page}: no rendered Plotly figure'
        finally: b.close()
    assert not outside, f'the pages asked the network for {outside}'


def test_broken_link_fails_the_build(tmp_path):
    "A notebook linking to a page that does not exist, or to a missing anchor, makes the build fail."
    import nbformat
    from biovis.commands.docs import build_docs, DocsError
    root = tmp_path/'checkout'
    for d in ('nbs', 'docs', 'data', 'reports/benchmarks'): (root/d).mkdir(parents=True)
    shutil.copy(ROOT/'docs'/'conf.py', root/'docs'/'conf.py')
    (root/'data'/'README.md').write_text('# Data\n')
    (root/'docs'/'about.md').write_text('# About\n')
    md = nbformat.v4.new_markdown_cell
    nbformat.write(nbformat.v4.new_notebook(cells=[md('# biovis\n\nsee [the module](01_mod.ipynb)')]), root/'nbs'/'index.ipynb')
    nbformat.write(nbformat.v4.new_notebook(cells=[md('# mod\n\n[gone](02_gone.ipynb)')]), root/'nbs'/'01_mod.ipynb')
    with pytest.raises(DocsError, match='02_gone'):
        build_docs(out=tmp_path/'html', root=root, cache=tmp_path/'cache', execute=())
    nbformat.write(nbformat.v4.new_notebook(cells=[md('# mod\n\n<a href="index.html#no-such-anchor">x</a>')]),
                   root/'nbs'/'01_mod.ipynb')
    with pytest.raises(DocsError, match='no-such-anchor'):
        build_docs(out=tmp_path/'html', root=root, cache=tmp_path/'cache', execute=())
