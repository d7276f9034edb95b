"""A warm `biovis` command for the tests: one process per xdist worker that has imported what the commands import
(PyTorch, fastai, biovis) and forks a child for each command, instead of a new interpreter that imports them again.

Each child is a real process running the console script's own entry point, `biovis.cli.main`, with the command's
arguments, environment, working directory, stdin from /dev/null and its own stdout/stderr files, and it exits with the
command's exit status: what the test sees is what `subprocess.run(['biovis', ...])` gives, less the 3-6 s of imports.
It is safe only while no Python thread and no OpenMP pool runs here when it forks: nothing is run, only imported (PyTorch
starts its OpenMP threads at the first parallel operation, in each child); the BLAS threads NumPy and SciPy start on import
are OpenBLAS's, which stops and restarts them around a fork, as every `multiprocessing` fork relies on. `warm()` checks that
no other Python thread runs, and the tests fall back to a fresh `biovis` process when one does. Tests that check what a fresh process
imports or prints at start-up (warnings) call `run_cli(..., fresh=True)`.

Protocol, one JSON line each way on stdin/stdout:
  {"op": "run", "args", "env", "cwd", "out", "err", "timeout"} -> {"code", "timed_out"}   (a command, waited for)
  {"op": "spawn", "args", "env", "cwd", "out", "err"} -> {"pid"}                          (a server, left running)
  {"op": "poll", "pid"} -> {"code"}; {"op": "wait", "pid", "timeout"} -> {"code", "timed_out"}; {"op": "signal", "pid", "sig"}
A spawned child is reaped when it is polled or waited for; whatever is still running when the tests end is killed.
"""
import atexit, json, os, signal, sys, time, traceback


def threads() -> int:
    import threading
    return threading.active_count()


def warm() -> bool:
    """Import what the commands import (every biovis module, PyTorch, fastai, Gradio, Panel, papermill; not TensorFlow or ONNX
    Runtime, which biovis imports only when a Keras or ONNX model is used), without running anything; True when no other
    Python thread was started."""
    import importlib, pkgutil
    import biovis.core                                                      # noqa: F401  (its warning filters first)
    import numpy, PIL.Image, pandas, scipy.stats, sklearn.metrics          # noqa: F401
    import torch, fastai.vision.all, gradio, panel, papermill               # noqa: F401
    import biovis
    for m in pkgutil.walk_packages(biovis.__path__, 'biovis.'):
        if '.migrations' not in m.name: importlib.import_module(m.name)     # (Alembic's env.py runs only under Alembic)
    return threads() == 1


def child(req: dict, close=()):
    "In the forked child: become the command and exit with its status (never returns)."
    code = 1
    try:
        for f in close: os.close(f)          # the protocol pipes are the warm process's, not the command's
        os.setpgid(0, 0)                     # its own process group: a timeout kills what it started too
        os.chdir(req['cwd'])
        os.environ.clear(); os.environ.update(req['env'])
        fin = os.open(os.devnull, os.O_RDONLY)
        fout = os.open(req['out'], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        ferr = fout if req['err'] == req['out'] else os.open(req['err'], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fin, 0); os.dup2(fout, 1); os.dup2(ferr, 2)
        for f in {fin, fout, ferr}: os.close(f)
        signal.signal(signal.SIGINT, signal.default_int_handler); signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.argv = ['biovis', *req['args']]
        from biovis.cli import main
        try: code = main(req['args'])
        except SystemExit as e: code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc(); code = 1
    finally:
        try: atexit._run_exitfuncs()
        except BaseException: pass
        for s in (sys.stdout, sys.stderr):
            try: s.flush()
            except BaseException: pass
        os._exit(int(code or 0) & 0xFF)


EXITED = {}      # pid -> exit status of the spawned children reaped so far


def poll(pid: int):
    "The exit status of `pid` as subprocess gives it (negative: killed by that signal), or None while it runs."
    if pid in EXITED: return EXITED[pid]
    done, status = os.waitpid(pid, os.WNOHANG)
    if done: EXITED[pid] = os.waitstatus_to_exitcode(status); return EXITED[pid]
    return None


def wait(pid: int, timeout: float, kill: bool = True) -> tuple:
    "The exit status of `pid` and whether it ran past `timeout` (then killed, with its process group, when `kill`)."
    end = time.monotonic() + timeout
    while True:
        code = poll(pid)
        if code is not None: return code, False
        if time.monotonic() > end:
            if not kill: return None, True
            try: os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError: pass
            return wait(pid, 60, kill=False)[0], True
        time.sleep(0.01)


def fork(req: dict, proto_fd: int) -> int:
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0: child(req, close=(proto_fd,))
    return pid


def serve():
    proto_in, proto_out = sys.stdin, os.fdopen(os.dup(1), 'w')
    os.dup2(2, 1)                            # whatever the imports print goes to stderr, not into the protocol
    ok = warm()
    proto_out.write(json.dumps(dict(ready=ok, threads=threads())) + '\n'); proto_out.flush()
    if not ok: return
    spawned = []
    try:
        for line in proto_in:
            req = json.loads(line)
            op = req.get('op', 'run')
            if op == 'run':
                code, timed_out = wait(fork(req, proto_out.fileno()), req['timeout'])
                reply = dict(code=code, timed_out=timed_out)
            elif op == 'spawn':
                spawned.append(fork(req, proto_out.fileno())); reply = dict(pid=spawned[-1])
            elif op == 'poll': reply = dict(code=poll(req['pid']))
            elif op == 'wait':
                code, timed_out = wait(req['pid'], req['timeout'], kill=False); reply = dict(code=code, timed_out=timed_out)
            elif op == 'signal':
                if poll(req['pid']) is None: os.kill(req['pid'], req['sig'])
                reply = {}
            else: reply = dict(error=f'unknown op {op!r}')
            proto_out.write(json.dumps(reply) + '\n'); proto_out.flush()
    finally:
        for pid in spawned:                  # a server a test forgot to stop must not outlive the tests
            if poll(pid) is None:
                try: os.kill(pid, signal.SIGKILL); wait(pid, 10, kill=False)
                except ProcessLookupError: pass


if __name__ == '__main__':
    serve()
