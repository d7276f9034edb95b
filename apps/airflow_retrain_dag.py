"""Airflow DAG: the biovis retrain check, daily, for teams that already run Airflow.

Drop this file into Airflow's `dags/` folder (Airflow and `apache-airflow-providers-papermill`
are NOT biovis dependencies; this module imports only when they are installed). Two tasks:

1. `retrain_check`: `biovis retrain --dry-run --json` decides (feedback >= FB_THRESH or drift);
   the DAG short-circuits when there is nothing to do.
2. `retrain`: `biovis retrain`, which builds the dataset version and runs
   `nbs/pipelines/retrain.ipynb` through papermill under the retrain lock, registers the
   candidate and promotes it only when it is not worse than production.

Teams that prefer Airflow's own papermill operator can use `retrain_notebook` instead of
`retrain` (set BIOVIS_AIRFLOW_PAPERMILL=1): it runs the same notebook with the
`PapermillOperator`, on a dataset version built by `biovis retrain --dry-run` beforehand; the
lock, the dataset version and the registry restore on failure are then Airflow's to arrange.

Settings come from the environment, as everywhere in biovis: BIOVIS_HOME (the checkout or
working folder), BIOVIS_FB_THRESH, BIOVIS_PROMOTION_MARGIN, BIOVIS_WANDB_MODE, BIOVIS_MODELS,
BIOVIS_DB_URL; biovis's `Settings` read them (the notebook's `margin = None` means that setting).
"""
from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

from airflow import DAG
from airflow.operators.python import PythonOperator, ShortCircuitOperator

HOME = Path(os.environ.get('BIOVIS_HOME', '/srv/biovis'))
BIOVIS = os.environ.get('BIOVIS_BIN', str(HOME/'.venv'/'bin'/'biovis'))
MODEL = os.environ.get('BIOVIS_RETRAIN_MODEL', 'bloodmnist')


def _biovis(*args) -> subprocess.CompletedProcess:
    r = subprocess.run([BIOVIS, *args], cwd=HOME, capture_output=True, text=True, env=dict(os.environ, BIOVIS_HOME=str(HOME)))
    print(r.stdout); print(r.stderr)
    if r.returncode != 0: raise RuntimeError(f'biovis {" ".join(args)} exited {r.returncode}: {r.stderr[-2000:]}')
    return r


def _due() -> bool:
    return json.loads(_biovis('retrain', '--name', MODEL, '--dry-run', '--json').stdout)['status'] == 'dry-run'


with DAG(dag_id='biovis_retrain', description='biovis: retrain from feedback and drift, promote if not worse',
         schedule='0 3 * * *', start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1,
         default_args=dict(retries=0, execution_timeout=timedelta(hours=6)), tags=['biovis']) as dag:
    check = ShortCircuitOperator(task_id='retrain_check', python_callable=_due)
    if os.environ.get('BIOVIS_AIRFLOW_PAPERMILL') == '1':
        from airflow.providers.papermill.operators.papermill import PapermillOperator
        retrain = PapermillOperator(
            task_id='retrain_notebook', input_nb=str(HOME/'nbs'/'pipelines'/'retrain.ipynb'),
            output_nb=str(HOME/'reports'/'runs'/'airflow-{{ ts_nodash }}'/'retrain.ipynb'),
            parameters=dict(name=MODEL, data=os.environ.get('BIOVIS_RETRAIN_DATA', 'sample'), run_id='airflow-{{ ts_nodash }}',
                            run_dir=str(HOME/'reports'/'runs'/'airflow-{{ ts_nodash }}')))
    else:
        retrain = PythonOperator(task_id='retrain', python_callable=lambda: _biovis('retrain', '--name', MODEL))
    check >> retrain
