"""The operations dashboard: drift of recent predictions against the model's reference, feedback
volume and accuracy, model versions and retraining runs (Panel + Plotly).

    biovis dashboard [--port 5006] [--auth]          # the usual way (login checks the store's admins)
    panel serve apps/dashboard.py                    # the same page under Panel's own server

Settings come from the environment (BIOVIS_HOME, BIOVIS_MODELS, BIOVIS_DB_URL, BIOVIS_AUTH, ...).
Nothing heavy at import: the views load their data, cached, when a session opens.
"""
from biovis.dashboard import build_dashboard

build_dashboard().servable()
