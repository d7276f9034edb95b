# Sphinx configuration of the biovis documentation site. Build it with `biovis docs [--out DIR]`
# (biovis/commands/docs.py, from nbs/98h_commands.docs.ipynb): that command stages the pages
# (notebooks, benchmark tables, API pages) into a source folder and runs Sphinx with this folder
# as its configuration directory (`-c docs`), `-W --keep-going`. Nothing here needs the network.
import shutil
from pathlib import Path
import plotly

project = 'biovis'
author = 'biovis developers'
copyright = '2026 biovis developers'
extensions = ['myst_nb']
nb_execution_mode = 'off'            # biovis docs executes the chosen notebooks itself (cached), see 98h_commands.docs
nb_merge_streams = True
myst_heading_anchors = 3             # the README's `#security-settings` style links resolve
myst_enable_extensions = ['colon_fence']
html_theme = 'alabaster'
html_theme_options = {'page_width': '1200px', 'sidebar_width': '260px'}
html_sidebars = {'**': ['about.html', 'searchfield.html', 'navigation.html']}
exclude_patterns = ['_build', '**.ipynb_checkpoints']
suppress_warnings = ['myst.header']  # nbdev notebooks start sections at any level (### under #); cosmetic only

PLOTLY_JS = Path(plotly.__file__).parent/'package_data'/'plotly.min.js'

def _plotly_pages(app, pagename, templatename, context, doctree):
    "Load the local plotly.js on the pages that hold a Plotly figure (no CDN: the site works offline)."
    if 'plotly-graph-div' in context.get('body', ''): app.add_js_file('plotly.min.js', priority=100)

def _copy_plotly(app, exc):
    if exc is None and app.builder.format == 'html':
        shutil.copy(PLOTLY_JS, Path(app.outdir)/'_static'/'plotly.min.js')

def setup(app):
    app.connect('html-page-context', _plotly_pages)
    app.connect('build-finished', _copy_plotly)
