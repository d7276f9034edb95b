"""Observability of a fleet for real: two `biovis serve` hosts sharing one store and registry, a real Prometheus
(Debian's `prometheus`) scraping them with deploy/prometheus's config and rules, promtool on those files, the
Grafana board's queries against that Prometheus, the Panel dashboard's Operations view, and the compose files."""
import io, json, math, os, re, shutil, subprocess, time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import BIOVIS, ROOT, wait_until_up, stop_process, spawn_cli
from biovis.bench.fleet import nginx_conf

DEPLOY = ROOT/'deploy'
PROM_DIR = DEPLOY/'prometheus'
PROMETHEUS, PROMTOOL, NGINX = (shutil.which(t) or shutil.which(t, path='/usr/sbin:/usr/bin') for t in ('prometheus', 'promtool', 'nginx'))
needs_prometheus = pytest.mark.skipif(not (PROMETHEUS and PROMTOOL), reason="Prometheus is not installed (apt-get install prometheus)")

OK_A, OK_B, BAD_B = 7, 4, 3          # /predict answered 200 by host a and host b, refused (4xx) by host b
FB_THRESH = 2
DRIFT_P = dict(softmax_ks=0.31, embedding_mmd=0.0009, image_stats_ks=2.5e-7, class_proportions_chi2=0.048)


from biovis.bench.fleet import free_port as _free_port     # noqa: E402  (one definition, the fleet's)


def _png(a):
    b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG'); return b.getvalue()


def _rules() -> dict:
    "record name -> its expression (whitespace folded), from deploy/prometheus/rules.yml."
    groups = yaml.safe_load((PROM_DIR/'rules.yml').read_text())['groups']
    return {r['record']: ' '.join(r['expr'].split()) for g in groups for r in g['rules'] if 'record' in r}


class Fleet:
    "The hosts, the Prometheus in front of them, and a client of its HTTP API."
    def __init__(self, root, models):
        self.root, self.models, self.procs = root, models, []
        self.db = f"sqlite:///{root/'shared'/'biovis.db'}"

    def start_host(self, name):
        home, port = self.root/name, _free_port()
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith('BIOVIS_')}
        env.update(BIOVIS_HOME=str(home), BIOVIS_MODELS=str(self.models), BIOVIS_DB_URL=self.db,
                   BIOVIS_UPLOADS=str(self.root/'shared'/'uploads'), BIOVIS_SECRET='observability-test-secret',
                   BIOVIS_PUBLIC_METRICS='1', BIOVIS_RATE_LIMIT='0', BIOVIS_FB_THRESH=str(FB_THRESH), GRADIO_ANALYTICS_ENABLED='False')
        log = open(home/'server.log', 'w')
        p = spawn_cli('serve', '--port', port, env=env, cwd=home, log=log)
        self.procs.append((p, log))
        return p, f'127.0.0.1:{port}', home/'server.log'

    def start_prometheus(self, targets):
        "Prometheus with deploy/prometheus/prometheus.yml, made fast (1 s scrapes and rule evaluations) and pointed at `targets`."
        d, port = self.root/'prometheus', _free_port()
        d.mkdir()
        cfg = yaml.safe_load((PROM_DIR/'prometheus.yml').read_text())
        cfg['global'].update(scrape_interval='1s', evaluation_interval='1s')
        cfg['rule_files'] = [str(PROM_DIR/f) for f in cfg['rule_files']]
        for job in cfg['scrape_configs']:
            if job['job_name'] == 'biovis':
                (d/'targets.yml').write_text(yaml.safe_dump([dict(targets=targets, labels=dict(deployment='test'))]))
                job['file_sd_configs'] = [dict(files=[str(d/'targets.yml')], refresh_interval='1s')]
            else: job['static_configs'] = [dict(targets=[f'127.0.0.1:{port}'])]
        (d/'prometheus.yml').write_text(yaml.safe_dump(cfg))
        log = open(d/'prometheus.log', 'w')
        p = subprocess.Popen([PROMETHEUS, f'--config.file={d/"prometheus.yml"}', f'--storage.tsdb.path={d/"data"}',
                              f'--web.listen-address=127.0.0.1:{port}', '--log.level=warn'], stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((p, log))
        self.prom = f'http://127.0.0.1:{port}'
        wait_until_up(p, self.prom + '/-/ready', d/'prometheus.log', 'prometheus', timeout=60)

    def query(self, expr) -> list:
        r = httpx.get(self.prom + '/api/v1/query', params=dict(query=expr), timeout=10).json()
        assert r['status'] == 'success', (expr, r)
        return r['data']['result']

    def by_instance(self, expr) -> dict:
        return {r['metric'].get('instance'): float(r['value'][1]) for r in self.query(expr)}

    def wait_for(self, expr, want, timeout=30):
        "Poll `expr` (by instance) until it equals `want`; the last answer otherwise."
        t0 = time.time()
        while True:
            got = self.by_instance(expr)
            if got == want or time.time() - t0 > timeout: return got
            time.sleep(0.3)

    def stop(self):
        for p, log in reversed(self.procs): stop_process(p, log)


@pytest.fixture(scope='module')
def model(sample_ds, tmp_path_factory):
    "A tiny classifier (one epoch, no test-time views) registered and promoted as blood v1: only its metrics matter here."
    from biovis.registry import ModelRegistry
    from biovis.workflow import train_and_register
    reg = ModelRegistry(tmp_path_factory.mktemp('obs-registry'))
    train_and_register(sample_ds, name='blood', epochs=1, tta=False, registry=reg, progress=False, promote='always')
    return reg.root


@pytest.fixture(scope='module')
def cells(sample_ds):
    x, y = sample_ds.tensors('test')
    return [_png(x[i]) for i in range(OK_A + OK_B)]


@pytest.fixture(scope='module')
def fleet(model, cells, tmp_path_factory):
    """Two hosts on one SQLite store and registry; a drift check recorded; one prediction per host and FB_THRESH corrections
    (each on the other host's prediction) and one refused upload before Prometheus starts, the rest of the requests spread over
    its scrapes (a counter first seen at its final value shows no rate)."""
    if not (PROMETHEUS and PROMTOOL): pytest.skip("Prometheus is not installed (apt-get install prometheus)")
    from biovis.feedback import FeedbackStore
    f = Fleet(tmp_path_factory.mktemp('fleet'), model)
    (f.root/'shared').mkdir()
    st = FeedbackStore(f.db, uploads_dir=f.root/'shared'/'uploads')
    st.record_drift('blood', 'v1', True, dict(p_values=DRIFT_P, threshold=0.0125, alpha=0.05, detected=True, flagged=['image_stats_ks']))
    st.record_drift('blood', 'v0', False, dict(p_values=dict(softmax_ks=0.9), threshold=0.0125, detected=False))   # newer, not served
    st.close()
    try:
        hosts = [f.start_host(n) for n in ('a', 'b')]
        for p, addr, log in hosts: wait_until_up(p, f'http://{addr}/ping', log, 'biovis serve', timeout=180)
        f.a, f.b = (f'http://{addr}' for _, addr, _ in hosts)
        f.inst_a, f.inst_b = (addr for _, addr, _ in hosts)
        c = httpx.Client(timeout=60)
        predict = lambda url, png: c.post(url + '/predict', files=[('files', ('cell.png', png, 'image/png'))])
        first = [predict(u, cells[i]).json()['predictions'][0] for i, u in enumerate((f.a, f.b))]
        for url, p in zip((f.b, f.a), first):                                    # each corrects the other host's prediction
            assert c.post(url + '/feedback', json=dict(prediction_id=p['id'], label=p['label'])).status_code == 200
        f.first = first
        assert 400 <= predict(f.b, b'not an image at all').status_code < 500          # its 4xx series exists before the first scrape
        f.start_prometheus([f.inst_a, f.inst_b])
        assert f.wait_for('biovis_requests_total{endpoint="/predict"}', {f.inst_a: 1.0, f.inst_b: 1.0}) == {f.inst_a: 1.0, f.inst_b: 1.0}
        jobs = [(f.a, cells[i]) for i in range(1, OK_A)] + [(f.b, cells[OK_A + i]) for i in range(1, OK_B)]
        for i, (url, png) in enumerate(jobs):                                     # over about 3 scrapes: rates see them
            assert predict(url, png).status_code == 200
            if i in (0, 2): assert 400 <= predict(f.b, b'not an image at all').status_code < 500   # the other BAD_B - 1
            time.sleep(0.3)
        yield f
    finally: f.stop()


# --- promtool on the deploy files -------------------------------------------------------------------------

@needs_prometheus
def test_promtool_checks_config_rules_and_alert_unit_tests():
    for args in (['check', 'config', 'prometheus.yml'], ['check', 'rules', 'rules.yml'], ['test', 'rules', 'rules_test.yml']):
        r = subprocess.run([PROMTOOL, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and 'SUCCESS' in r.stdout + r.stderr, (args, r.stdout, r.stderr)
    # every alert rule has a unit test that expects it to fire
    alerts = {r['alert'] for g in yaml.safe_load((PROM_DIR/'rules.yml').read_text())['groups'] for r in g['rules'] if 'alert' in r}
    tested = {a['alertname'] for t in yaml.safe_load((PROM_DIR/'rules_test.yml').read_text())['tests']
              for a in t.get('alert_rule_test', []) if a['exp_alerts']}
    assert alerts == tested, alerts ^ tested


# --- a real Prometheus scraping two real hosts ------------------------------------------------------------

def test_prometheus_counts_the_requests_of_each_host(fleet):
    f = fleet
    ok = f.wait_for('sum by (instance) (biovis_requests_total{endpoint="/predict",status="200"})', {f.inst_a: OK_A, f.inst_b: OK_B})
    assert ok == {f.inst_a: OK_A, f.inst_b: OK_B}
    assert f.by_instance('sum by (instance) (biovis_requests_total{endpoint="/predict",status=~"4.."})') == {f.inst_b: BAD_B}
    assert f.by_instance('sum(biovis_requests_total{endpoint="/predict"})') == {None: OK_A + OK_B + BAD_B}
    assert f.by_instance('sum by (instance) (biovis_predictions_total{model="blood"})') == {f.inst_a: OK_A, f.inst_b: OK_B}
    assert f.by_instance('up{job="biovis"}') == {f.inst_a: 1, f.inst_b: 1}


def test_recording_rules_evaluate_per_host(fleet):
    f = fleet
    f.wait_for('sum by (instance) (biovis_requests_total{endpoint="/predict",status="200"})', {f.inst_a: OK_A, f.inst_b: OK_B})
    time.sleep(2)                                           # a rule evaluation after the last scrape
    rate = f.by_instance('instance:biovis_requests:rate1m')
    assert set(rate) == {f.inst_a, f.inst_b} and all(v > 0 for v in rate.values()), rate
    p99 = f.by_instance('instance:biovis_predict_seconds:p99_5m')
    assert set(p99) == {f.inst_a, f.inst_b} and all(0 < v <= 10 for v in p99.values()), p99
    assert f.by_instance('instance:biovis_request_errors:ratio_rate5m') == {f.inst_a: 0, f.inst_b: 0}    # 0, not missing
    rejects = f.by_instance('instance:biovis_request_rejects:ratio_rate5m')
    assert rejects[f.inst_a] == 0 and 0 < rejects[f.inst_b] < 1, rejects
    assert {r['metric']['model']: float(r['value'][1]) > 0 for r in f.query('job:biovis_predictions:rate5m')} == {'blood': True}
    age = f.query('model:biovis_last_prediction:age_seconds')
    assert [r['metric']['model'] for r in age] == ['blood'] and 0 <= float(age[0]['value'][1]) < 120


def test_store_metrics_backlog_drift_and_their_alerts(fleet):
    f = fleet
    # every host reports the shared store's figures: the backlog counts the corrections sent to either host
    assert f.by_instance('biovis_feedback_backlog{model="blood"}') == {f.inst_a: FB_THRESH, f.inst_b: FB_THRESH}
    assert f.by_instance('biovis_feedback_threshold') == {f.inst_a: FB_THRESH, f.inst_b: FB_THRESH}
    assert f.by_instance('biovis_store_up') == {f.inst_a: 1, f.inst_b: 1}
    pv = {r['metric']['test']: float(r['value'][1]) for r in f.query(f'biovis_drift_p_value{{instance="{f.inst_a}"}}')}
    assert pv == DRIFT_P
    # the served version's check counts, not the newer check of v0
    assert {(r['metric']['version'], r['value'][1]) for r in f.query('biovis_drift_detected')} == {('v1', '1')}
    assert f.by_instance('biovis_drift_threshold') == {f.inst_a: 0.0125, f.inst_b: 0.0125}
    newest = max(f.by_instance('biovis_last_prediction_timestamp_seconds{model="blood"}').values())
    assert time.time() - 120 < newest <= time.time() + 1
    firing = {}
    t0 = time.time()
    while time.time() - t0 < 20 and len(firing) < 2:
        alerts = httpx.get(f.prom + '/api/v1/alerts', timeout=10).json()['data']['alerts']
        firing = {a['labels']['alertname']: a['labels'] for a in alerts if a['state'] == 'firing'}
        time.sleep(0.5)
    assert firing.get('BiovisFeedbackBacklog', {}).get('model') == 'blood', firing
    assert firing.get('BiovisDriftDetected', {}).get('version') == 'v1', firing
    assert not {'BiovisHostDown', 'BiovisHighErrorRate', 'BiovisStoreUnreachable', 'BiovisNoPredictions'} & set(firing), firing
    # one more correction: the scrapes show it once the hosts' 5 s cache has expired
    p = f.first[0]
    assert httpx.post(f.a + '/feedback', json=dict(prediction_id=p['id'], label=p['label']), timeout=30).status_code == 200
    want = {f.inst_a: FB_THRESH + 1, f.inst_b: FB_THRESH + 1}
    assert f.wait_for('biovis_feedback_backlog{model="blood"}', want, timeout=20) == want


# --- the Grafana board ------------------------------------------------------------------------------------

_NOT_METRICS = {'by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'bool', 'and', 'or', 'unless', 'offset', 'inf', 'nan'}

def metric_names(expr: str) -> set:
    "The metric names a PromQL expression selects (not its functions, keywords, labels or durations)."
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r'\{[^}]*\}|\[[^\]]*\]', ' ', e)
    e = re.sub(r'\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)', ' ', e)
    return {m.group() for m in re.finditer(r'(?<![\w.])[A-Za-z_:][\w:]*', e)
            if m.group() not in _NOT_METRICS and not e[m.end():].lstrip().startswith('(')}


def _board_targets():
    board = json.loads((DEPLOY/'grafana'/'dashboards'/'biovis.json').read_text())
    return board, [(p['title'], t['expr']) for p in board['panels'] for t in p.get('targets', [])]


def test_metric_names_of_an_expression():
    assert metric_names('sum by (job, instance) (rate(biovis_requests_total{endpoint!~"/metrics|/ping"}[1m]))') == {'biovis_requests_total'}
    assert metric_names('max by (model) (a_b) >= on() group_left() max(c:d:e) or vector(0)') == {'a_b', 'c:d:e'}
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m])))') == {'x_bucket'}


def test_grafana_board_queries_run_on_the_real_prometheus(fleet):
    f = fleet
    board, targets = _board_targets()
    assert len(targets) >= 15 and board['uid'] == 'biovis-fleet'
    f.wait_for('sum by (instance) (biovis_requests_total{endpoint="/predict",status="200"})', {f.inst_a: OK_A, f.inst_b: OK_B})
    time.sleep(1.5)
    known = set(httpx.get(f.prom + '/api/v1/label/__name__/values', timeout=10).json()['data']) | set(_rules())
    for title, expr in targets:
        unknown = metric_names(expr) - known
        assert not unknown, f'{title}: {expr} uses {unknown}, which biovis does not export nor the rules record'
        assert f.query(expr), f'{title}: {expr} returned nothing'          # parses (status success) and has data
    # the board's datasource is the provisioned one, and the provider loads the folder compose mounts
    ds = yaml.safe_load((DEPLOY/'grafana'/'provisioning'/'datasources'/'prometheus.yml').read_text())['datasources'][0]
    assert {p['datasource']['uid'] for p in board['panels'] if 'datasource' in p} == {ds['uid']}
    prov = yaml.safe_load((DEPLOY/'grafana'/'provisioning'/'dashboards'/'biovis.yml').read_text())['providers'][0]
    compose = yaml.safe_load((DEPLOY/'compose.yaml').read_text())
    assert f"./grafana/dashboards:{prov['options']['path']}:ro" in compose['services']['grafana']['volumes']
    assert ds['url'] == 'http://prometheus:9090' and 'prometheus' in compose['services']


# --- the Panel dashboard's Operations view ------------------------------------------------------------

def test_ops_view_reads_prometheus_per_host(fleet):
    from biovis.ops import OPS_QUERIES, Prometheus, ops_figures, ops_hosts, ops_series
    f = fleet
    rules = _rules()
    for name, (record, expr, _, _) in OPS_QUERIES.items():                  # the view asks what the rules record
        assert ' '.join(expr.split()) == rules[record], name
    f.wait_for('sum by (instance) (biovis_requests_total{endpoint="/predict",status="200"})', {f.inst_a: OK_A, f.inst_b: OK_B})
    time.sleep(1.5)
    with Prometheus(f.prom) as prom:
        hosts = {h['host']: h for h in ops_hosts(prom)}
        series = ops_series(prom, minutes=5)
    assert set(hosts) == {f.inst_a, f.inst_b}
    assert (hosts[f.inst_a]['predict_requests'], hosts[f.inst_b]['predict_requests']) == (OK_A, OK_B + BAD_B)
    assert all(h['up'] == 1 and h['requests_per_s'] > 0 and h['error_share'] == 0 and 0 < h['p99_predict_s'] <= 10 for h in hosts.values())
    assert hosts[f.inst_a]['refused_share'] == 0 < hosts[f.inst_b]['refused_share']
    figs = ops_figures(series)
    assert set(figs) == set(OPS_QUERIES)
    for name, fig in figs.items():
        assert sorted(t.name for t in fig.data) == sorted([f.inst_a, f.inst_b]), name       # a line per host
    vals = lambda fig, host: [v for v in next(t for t in fig.data if t.name == host).y if not math.isnan(v)]
    last = lambda fig, host: vals(fig, host)[-1]
    assert max(vals(figs['throughput'], f.inst_a)) > 0 and max(vals(figs['throughput'], f.inst_b)) > 0
    assert last(figs['rejects'], f.inst_b) > 0 and last(figs['errors'], f.inst_a) == 0
    assert math.isclose(last(figs['latency_p99'], f.inst_a), hosts[f.inst_a]['p99_predict_s'], rel_tol=0.5)


def test_dashboard_has_an_operations_card_when_prometheus_is_set(fleet, monkeypatch):
    import biovis.dashboard as dash
    f = fleet
    dash.clear_cache()
    o = dash.load_ops(f.prom)
    assert {h['host'] for h in o['hosts']} == {f.inst_a, f.inst_b} and set(o['series']['throughput']) == {f.inst_a, f.inst_b}
    title = lambda app: [str(getattr(x, 'title', '')) for x in app.main]
    monkeypatch.delenv('BIOVIS_PROMETHEUS_URL', raising=False); monkeypatch.delenv('BIOVIS_AUTH', raising=False)
    assert not any('Operations' in t for t in title(dash.build_dashboard(models_dir=f.models, db_url=f.db)))
    monkeypatch.setenv('BIOVIS_PROMETHEUS_URL', f.prom + '/')                # from the setting
    assert f'Operations (Prometheus at {f.prom})' in title(dash.build_dashboard(models_dir=f.models, db_url=f.db))
    assert 'cannot be reached' in dash.load_ops('http://127.0.0.1:9')['error']


# --- the compose files, and nginx in front of the two hosts ------------------------------------------------

def _core_env_vars() -> set:
    return set(re.findall(r"'(BIOVIS_[A-Z_]+)'", (ROOT/'biovis'/'core.py').read_text()))


def test_compose_file_wires_the_fleet():
    c = yaml.safe_load((DEPLOY/'compose.yaml').read_text())
    sv = c['services']
    assert {'biovis-1', 'biovis-2', 'postgres', 'prometheus', 'grafana', 'nginx'} <= set(sv)
    hosts = [n for n in sv if re.fullmatch(r'biovis-\d+', n)]
    read = _core_env_vars()
    for n, s in sv.items():
        env = s.get('environment') or {}
        unknown = {k for k in env if k.startswith('BIOVIS_')} - read
        assert not unknown, f'{n} sets {unknown}, which biovis.core.Settings does not read'
    envs = [sv[n]['environment'] for n in hosts]
    for k in ('BIOVIS_DB_URL', 'BIOVIS_MODELS', 'BIOVIS_UPLOADS', 'BIOVIS_SECRET'):   # what every host must share
        assert len({e[k] for e in envs}) == 1, k
    assert envs[0]['BIOVIS_DB_URL'].startswith('postgresql+psycopg://') and '@postgres:5432/' in envs[0]['BIOVIS_DB_URL']
    assert all('shared:/shared' in sv[n]['volumes'] for n in hosts) and set(c['volumes']) >= {'shared', 'pgdata'}
    assert envs[0]['BIOVIS_TRUSTED_PROXIES'] == sv['nginx']['networks']['biovis']['ipv4_address']
    assert sv['dashboard']['environment']['BIOVIS_PROMETHEUS_URL'] == 'http://prometheus:9090'
    # every file compose mounts from deploy/ is there, and the image is built from the checkout by deploy/Dockerfile
    for s in sv.values():
        for v in s.get('volumes', []):
            if v.startswith('./'): assert (DEPLOY/v.split(':')[0]).exists(), v
    assert (DEPLOY/sv['biovis-1']['build']['context']/sv['biovis-1']['build']['dockerfile']).resolve() == (DEPLOY/'Dockerfile').resolve()
    docker = (DEPLOY/'Dockerfile').read_text()
    assert 'EXPOSE 7860' in docker and '"--port", "7860"' in docker
    for line in re.findall(r'^COPY (.+)$', docker, re.M):
        for src in line.split()[:-1]: assert (ROOT/src).exists(), src
    # Prometheus scrapes each host (file service discovery) and nginx balances over the same hosts
    targets = yaml.safe_load((PROM_DIR/'targets'/'biovis.yml').read_text())[0]['targets']
    assert sorted(targets) == sorted(f'{n}:7860' for n in hosts)
    conf = (DEPLOY/'nginx'/'nginx.conf').read_text()
    for up in ('biovis_api', 'biovis_ui'):
        block = re.search(r'upstream %s \{(.*?)\}' % up, conf, re.S).group(1)
        assert sorted(re.findall(r'server (\S+?)[ ;]', block)) == sorted(targets), up
    assert 'hash $remote_addr' in re.search(r'upstream biovis_ui \{(.*?)\}', conf, re.S).group(1)


@pytest.mark.skipif(not NGINX, reason='nginx is not installed (apt-get install nginx)')
def test_nginx_config_balances_the_two_hosts(fleet, tmp_path):
    "deploy/nginx/nginx.conf with the test's hosts and a free port: the API goes round robin, /metrics is not exposed."
    f, port = fleet, _free_port()
    nginx_conf(tmp_path, [f.inst_a, f.inst_b], port)
    base = [NGINX, '-p', str(tmp_path), '-e', str(tmp_path/'error.log'), '-c', str(tmp_path/'nginx.conf')]
    t = subprocess.run([*base, '-t'], capture_output=True, text=True, timeout=30)
    assert t.returncode == 0, t.stderr
    log = open(tmp_path/'nginx.out', 'w')
    p = subprocess.Popen([*base, '-g', 'daemon off;'], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_up(p, f'http://127.0.0.1:{port}/ping', tmp_path/'nginx.out', 'nginx', timeout=20)
        pings = lambda: {u: float(re.search(r'biovis_requests_total\{endpoint="/ping",status="200"\} (\S+)', httpx.get(u + '/metrics').text).group(1))
                         for u in (f.a, f.b)}
        before = pings()
        for _ in range(10): assert httpx.get(f'http://127.0.0.1:{port}/ping').status_code == 200
        after = pings()
        assert sorted(after[u] - before[u] for u in after) == [5, 5], (before, after)
        assert httpx.get(f'http://127.0.0.1:{port}/metrics').status_code == 404
    finally: stop_process(p, log)
