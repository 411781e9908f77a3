"""Several machines, restarts and a rank that stops, simulated on one machine: torchrun on loopback, gloo, the tiny sample.

- Two torchrun agents (`--nnodes=2 --nproc_per_node=1`, one c10d rendezvous) train exactly as one agent with two
  processes (`--standalone --nproc_per_node=2`), the same global batch.
- `--max-restarts=1` with `--resume auto`: rank 1 killed (SIGKILL) after the first checkpoint, torchrun starts the
  group again, and the restarted workers find their run folder (by the rendezvous id) and continue it from the
  checkpoint, ending with the uninterrupted run's losses and weights.
- A rank stopped with SIGSTOP ends the job shortly after `--timeout`, with one line naming it.
- `--resume auto` in a plain process: starts, finishes, starts again, and refuses what it cannot do, in one line.

Every launch runs in its own process group with a time limit; the groups are killed at the end whatever happens.
`pytest -s tests/test_elastic.py` prints the figures: weight differences, losses, times.
"""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import free_port, kill_launch
EPOCHS = 3
# the recipe's own augmentation (crops, flips) and MixUp: every rank draws random numbers, which a resume must restore
TRAIN = ["train", "--data", "tiny", "--device", "cpu", "--size", "32", "--epochs", str(EPOCHS), "--bs", "16",
         "--width", "0.5", "--no-progress"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
KEYS = ("epoch", "train_loss", "valid_loss", "accuracy")
LIMIT = 150  # seconds any launch may take



@contextmanager
def launches(cache, cwd):
    """`start(name, argv)` starts a launch in its own process group, output in cwd/name.out|.err; all are killed after."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "DLCOURSE_CACHE": str(cache),
           "DLCOURSE_DEBUG": ""}
    procs = []

    def start(name, argv):
        with open(cwd / f"{name}.out", "w") as out, open(cwd / f"{name}.err", "w") as err:
            proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err, env=env, start_new_session=True)
        proc.name = name
        procs.append(proc)
        return proc
    try:
        yield start
    finally:
        for proc in procs:
            kill_launch(proc)  # the agent, its workers (in sessions of their own), a stopped worker too
            proc.wait()


def wait_all(procs, timeout=LIMIT):
    """Wait for every launch; their exit statuses."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    return [proc.returncode for proc in procs]


def output(cwd, name, part="err"):
    return (cwd / f"{name}.{part}").read_text()


def wait_for(path, procs, timeout=LIMIT):
    """Wait until `path` exists, failing if a launch ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        ended = [p.name for p in procs if p.poll() is not None]
        assert not ended, f"{ended} ended before {path} appeared"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.02)


def worker_pids(procs) -> dict[int, int]:
    """{rank: pid} of the workers the torchrun agents `procs` started (their children with a RANK)."""
    from dlcourse.distributed import _environment
    found = {}
    for proc in procs:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for pid in map(int, children):
            env = _environment(pid) or {}
            if "RANK" in env:
                found[int(env["RANK"])] = pid
    return found


def two_agents(start, argv, port, run_id, extra=()):
    """Two torchrun agents of one node each, meeting at 127.0.0.1:port: two 'machines' on loopback."""
    rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            f"--rdzv_id={run_id}", *extra]
    return [start(f"agent{n}", [*TORCHRUN, *rdzv, "-m", "dlcourse", *argv]) for n in range(2)]


def epochs(folder):
    return [{k: row[k] for k in KEYS} for row in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]


def weights_diff(a, b) -> float:
    """The largest absolute difference between the final weights of two runs."""
    from safetensors.torch import load_file
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """One uninterrupted run: one agent, two processes, `--standalone`."""
    where = tmp_path_factory.mktemp("reference")
    with launches(cache, where) as start:
        proc = start("standalone", [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "dlcourse", *TRAIN,
                                    "--out", str(where / "run")])
        assert wait_all([proc]) == [0], output(where, "standalone")[-3000:]
    results = json.loads((where / "run" / "results.json").read_text())
    assert results["status"] == "finished" and results["world_size"] == 2
    return where / "run"


def test_two_agents_train_as_one(reference, cache, tmp_path):
    """Two agents of one process each (a c10d rendezvous, as two machines would) = one agent with two processes."""
    start_time = time.monotonic()
    with launches(cache, tmp_path) as start:
        agents = two_agents(start, [*TRAIN, "--resume", "auto", "--out", str(tmp_path / "run")], free_port(),
                            f"two-agents-{uuid.uuid4().hex[:8]}")
        statuses = wait_all(agents)
    assert statuses == [0, 0], output(tmp_path, "agent0")[-2000:] + output(tmp_path, "agent1")[-2000:]
    seconds = time.monotonic() - start_time
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    assert results["world_size"] == 2 and results["status"] == "finished"
    diff = weights_diff(tmp_path / "run", reference)
    print(f"\ntwo agents vs one: {seconds:.1f} s, max |w_2agents - w_standalone| = {diff:.1e}, accuracy "
          f"{results['accuracy']:.4f} vs {expected['accuracy']:.4f}")
    for row in epochs(tmp_path / "run"):
        print("  ", row)
    assert diff <= 1e-6
    assert results["accuracy"] == expected["accuracy"]
    assert epochs(tmp_path / "run") == epochs(reference)
    printed = output(tmp_path, "agent0", "out") + output(tmp_path, "agent1", "out")
    assert printed.count("--resume auto: no run in") == 1  # rank 0 alone says it, on whichever agent it runs
    assert printed.count("train_loss") == 1  # one epoch table


def test_killed_rank_restarts_and_resumes(reference, cache, tmp_path):
    """SIGKILL of rank 1 after the first checkpoint: torchrun restarts both workers, which continue the same run."""
    argv = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1", "-m", "dlcourse", *TRAIN,
            "--resume", "auto"]  # no --out: the run is runs/train-001, found again by the launch's rendezvous id
    start_time = time.monotonic()
    with launches(cache, tmp_path) as start:
        proc = start("restarted", argv)
        wait_for(tmp_path / "runs" / "train-001" / "checkpoint" / "checkpoint.json", [proc])
        rank1 = worker_pids([proc])[1]
        os.kill(rank1, signal.SIGKILL)
        killed_at = time.monotonic() - start_time
        status = wait_all([proc])
    printed, errors = output(tmp_path, "restarted", "out"), output(tmp_path, "restarted")
    assert status == [0], errors[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["train-001"]  # one run, continued
    folder = tmp_path / "runs" / "train-001"
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "finished"
    assert results["resumed_by"] == [f"dlcourse {' '.join(TRAIN)} --resume auto"]
    (after,) = results["resumed_after"]
    assert 1 <= after < EPOCHS, after
    assert f"--resume auto: continuing {Path('runs') / 'train-001'} from its checkpoint, after {after} of {EPOCHS} " \
           f"epochs" in printed
    diff = weights_diff(folder, reference)
    print(f"\nkilled rank 1 (SIGKILL) at {killed_at:.1f} s, after the checkpoint of epoch {after - 1}; "
          f"the launch ended at {time.monotonic() - start_time:.1f} s, status {status[0]}")
    print("restarted run:  ", *epochs(folder), sep="\n  ")
    print("uninterrupted:  ", *epochs(reference), sep="\n  ")
    print(f"max |w_restarted - w_uninterrupted| = {diff:.1e}")
    assert epochs(folder) == epochs(reference)
    assert diff <= 1e-6


def test_stopped_rank_ends_the_job_within_the_timeout(cache, tmp_path):
    """SIGSTOP of rank 1 on two agents: rank 0 gives up after --timeout, names rank 1 in one line, and the job ends."""
    timeout = 4
    with launches(cache, tmp_path) as start:
        agents = two_agents(start, [*TRAIN, "--timeout", str(timeout), "--out", str(tmp_path / "run")], free_port(),
                            f"stopped-{uuid.uuid4().hex[:8]}")
        wait_for(tmp_path / "run" / "checkpoint" / "checkpoint.json", agents)
        rank1 = worker_pids(agents)[1]
        os.kill(rank1, signal.SIGSTOP)
        stopped = time.monotonic()
        message_after = None
        while any(a.poll() is None for a in agents) and time.monotonic() - stopped < 60:
            if message_after is None and "dlcourse train: error:" in output(tmp_path, "agent0") + output(tmp_path, "agent1"):
                message_after = time.monotonic() - stopped
            time.sleep(0.02)
        ended_after = time.monotonic() - stopped
        statuses = wait_all(agents, timeout=5)
    errors = output(tmp_path, "agent0") + output(tmp_path, "agent1")
    lines = [line for line in errors.splitlines() if line.startswith("dlcourse train:")]
    print(f"\nrank 1 stopped (SIGSTOP); rank 0's message after {message_after if message_after is None else round(message_after, 1)} s, both agents ended after "
          f"{ended_after:.1f} s (--timeout {timeout}), statuses {statuses}:\n{lines[0] if lines else errors[-2000:]}")
    assert len(lines) == 1, errors[-3000:]
    assert "rank 1 stopped responding" in lines[0] and f"waited {timeout} s" in lines[0]
    assert "Traceback" not in lines[0]
    assert all(status != 0 for status in statuses)
    assert message_after is not None and message_after < timeout + 8
    assert ended_after < timeout + 12  # not torchrun's 30 s wait for a stopped worker
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "failed" and "rank 1 stopped responding" in record["error"]


# ---------------------------------------------------------------- --resume auto in a plain process (no torchrun)

SMALL = ["train", "--data", "tiny", "--device", "cpu", "--size", "16", "--epochs", "1", "--bs", "32", "--width",
         "0.25", "--no-progress"]


@pytest.fixture
def dlcourse(cache, monkeypatch, capsys):
    """`dlcourse ARGS` in this process (PyTorch imported once), as a plain process: (status, stdout, stderr)."""
    from dlcourse.cli import main
    from dlcourse.distributed import LAUNCH_VARS
    monkeypatch.setenv("DLCOURSE_CACHE", str(cache))
    monkeypatch.delenv("DLCOURSE_DEBUG", raising=False)
    for name in (*LAUNCH_VARS, "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)

    def run(*args, env=None):
        with monkeypatch.context() as m:
            for name, value in (env or {}).items():
                m.setenv(name, value)
            status = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return status, out, err
    return run


def one_line_error(result, status, *words):
    code, out, err = result
    assert code == status, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_resume_auto_starts_finishes_and_refuses(dlcourse, tmp_path):
    """In a plain process: a new run, then nothing left to do, a start again before any checkpoint, bad uses."""
    run = tmp_path / "run"
    status, out, err = dlcourse(*SMALL, "--resume", "auto", "--out", run)
    assert status == 0, err
    assert f"--resume auto: no run in {run} yet: starting it" in out
    first = json.loads((run / "results.json").read_text())
    assert first["status"] == "finished" and "resumed_by" not in first
    status, out, err = dlcourse(*SMALL, "--resume", "auto", "--out", run)  # the same command again
    assert status == 0, err
    assert out.strip() == f"--resume auto: {run} has finished (1 epoch): nothing left to do"
    assert json.loads((run / "results.json").read_text()) == first
    # a run that stopped before its first checkpoint starts again, in its own folder
    record = {**first, "status": "failed"}
    record.pop("epochs")
    (run / "results.json").write_text(json.dumps(record))
    for path in (run / "checkpoint").iterdir():
        path.unlink()
    status, out, err = dlcourse(*SMALL, "--resume", "auto", "--out", run)
    assert status == 0, err
    assert f"--resume auto: {run} stopped before its first checkpoint: starting it again there" in out
    again = json.loads((run / "results.json").read_text())
    assert again["status"] == "finished" and again["resumed_after"] == [0]
    assert [{k: r[k] for k in KEYS} for r in again["epochs"]] == [{k: r[k] for k in KEYS} for r in first["epochs"]]
    # what it cannot do, in one line
    one_line_error(dlcourse(*SMALL, "--resume", "auto"), 2, "--resume auto needs --out RUN_DIR outside torchrun")
    static = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port()), "TORCHELASTIC_RUN_ID": "none"}  # torchrun --master-addr ...: no id
    one_line_error(dlcourse(*SMALL, "--resume", "auto", env=static), 2,
                   "--resume auto needs --out RUN_DIR under a torchrun launch without rendezvous id")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    one_line_error(dlcourse(*SMALL, "--resume", "auto", "--out", other), 2,
                   f"--out {other} holds files but no dlcourse run")
    one_line_error(dlcourse(*SMALL, "--lr", "0.5", "--resume", "auto", "--out", run), 2, "--lr 0.5 conflicts")
    (run / "results.json").write_text(json.dumps({**again, "subcommand": "lr-find"}))
    one_line_error(dlcourse(*SMALL, "--resume", "auto", "--out", run), 2, "is a run of dlcourse lr-find")
