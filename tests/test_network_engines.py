"""Engine equivalence: 2 DDP ranks (torchrun, gloo) and 2 Horovod ranks (horovodrun --gloo)
train the same weights as one process fed the same global batches, and every rank ends with
identical weights.

BatchNorm and dropout: each rank normalises with its own micro-batch statistics, so the
single-process reference is the same global batch as two micro-batches with accumulated
gradients (``accumulate=2``, see deephemnma/network/engines.py); dropout masks are seeded
per (epoch, step, slot), slot = rank·accumulate + micro-batch, identically in both.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

WORKER = r'''
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from deephemnma.network.train import TrainSettings, train

star, out, engine, accumulate = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
epochs = int(sys.argv[5]) if len(sys.argv) > 5 else 1
out.mkdir(parents=True, exist_ok=True)
s = TrainSettings.from_config({"seed": 0, "network": dict(recipe="fast", arch="resnet10", hidden=[64, 32], dropout=0.5, epochs=epochs, batch_size=4,
                                   accumulate=accumulate, lr=1e-3, warmup_epochs=0, schedule="constant",
                                   num_workers=0, val_fraction=0.25, test_fraction=0.0, engine=engine, device="cpu")})
r = train(star, out, s)
state = {k: v.detach().clone() for k, v in r.model.state_dict().items()}
torch.save({"state": state, "history": r.history, "world": r.engine.world_size},
           out / f"rank{r.engine.rank}.pt")
r.engine.close()
'''


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", DEEPHEMNMA_THREADS="1")
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from deephemnma.network.toydata import make_toy_particles

    d = tmp_path_factory.mktemp("engines")
    star = make_toy_particles(d / "data", n=40, box=32, seed=4)
    worker = d / "worker.py"
    worker.write_text(WORKER)
    return d, star, worker


def _run(cmd, timeout=240):
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def reference(setup):
    """One process, global batch 8 as two accumulated micro-batches of 4; and controls."""
    d, star, worker = setup
    _run([sys.executable, worker, star, d / "single", "single", 2])
    _run([sys.executable, worker, star, d / "single_b4", "single", 1])
    return {name: torch.load(d / name / "rank0.pt", weights_only=True) for name in ("single", "single_b4")}


def _params(res):
    return {k: v for k, v in res["state"].items() if "running" not in k and "num_batches" not in k}


def _check(ranks, reference):
    ref, other = _params(reference["single"]), _params(reference["single_b4"])
    for r in ranks:
        assert r["world"] == 2
    # identical weights (and BatchNorm buffers) on every rank
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k
    # same weights as the single process fed the same global batches
    p = _params(ranks[0])
    worst = max(float((p[k] - ref[k]).abs().max()) for k in ref)
    control = max(float((other[k] - ref[k]).abs().max()) for k in ref)
    assert worst < 2e-5, worst
    assert control > 100 * max(worst, 1e-7), (control, worst)  # a different batch really differs
    # metrics are summed over both ranks: the training loss is the single process's, and the
    # validation covered every validation particle once. (Validation *values* differ slightly:
    # eval-mode BatchNorm uses running statistics, averaged over ranks vs updated micro-batch
    # after micro-batch in the single process.)
    h, hr = ranks[0]["history"][-1], reference["single"]["history"][-1]
    assert h["n_val"] == hr["n_val"] == 10
    assert h["train_loss"] == pytest.approx(hr["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_ddp_two_ranks_equal_single_process(setup, reference):
    d, star, worker = setup
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          str(worker), str(star), str(d / "ddp"), "ddp", "1"])
    _check([torch.load(d / "ddp" / f"rank{r}.pt", weights_only=True) for r in range(2)], reference)
    assert (d / "ddp" / "last.pt").exists() and (d / "ddp" / "metrics.csv").exists()


def _horovodrun() -> str | None:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return None
    exe = Path(sys.executable).parent / "horovodrun"
    return str(exe) if exe.exists() else shutil.which("horovodrun")


@pytest.mark.slow
def test_horovod_two_ranks_equal_single_process(setup, reference):
    hr = _horovodrun()
    if hr is None:
        pytest.skip("horovod.torch is not installed (scripts/install_horovod.sh builds it)")
    d, star, worker = setup
    _run([hr, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(worker), str(star),
          str(d / "hvd"), "horovod", "1"])
    _check([torch.load(d / "hvd" / f"rank{r}.pt", weights_only=True) for r in range(2)], reference)
    # rank 0 alone wrote the checkpoint and the logs
    assert (d / "hvd" / "last.pt").exists() and (d / "hvd" / "metrics.csv").exists()


@pytest.mark.slow
def test_horovod_resume_is_bit_for_bit(setup):
    """Two Horovod ranks: one epoch, then a second that resumes from last.pt, end with the
    weights and Adam moments of two epochs in one go. (Horovod's DistributedOptimizer is a new
    optimiser with empty state: a resumed state loaded before wrapping was silently lost.)"""
    hr = _horovodrun()
    if hr is None:
        pytest.skip("horovod.torch is not installed (scripts/install_horovod.sh builds it)")
    d, star, worker = setup
    run = [hr, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(worker), str(star)]
    _run(run + [str(d / "hvd_two"), "horovod", "1", "2"])
    _run(run + [str(d / "hvd_resumed"), "horovod", "1", "1"])
    _run(run + [str(d / "hvd_resumed"), "horovod", "1", "2"])
    a = torch.load(d / "hvd_two" / "last.pt", weights_only=True)
    b = torch.load(d / "hvd_resumed" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["model_state"].items():
        assert torch.equal(v, b["model_state"][k]), k
    sa, sb = a["optimizer_state"]["state"], b["optimizer_state"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        assert float(sb[i]["step"]) == float(sa[i]["step"]) > 1
        assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) and torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])


SRUN_TASK = r'''
import sys
import numpy as np
from deephemnma.network.engines import detect_engine, make_engine
e = make_engine(sys.argv[1], "cpu")
print("RESULT", detect_engine(), e.name, e.rank, e.world_size, e.local_size, float(e.all_sum(np.array([e.rank + 1.0]))[0]), flush=True)
e.close()
'''


@pytest.mark.parametrize("engine", ["ddp", "horovod"])
def test_srun_tasks_start_a_distributed_engine(engine, tmp_path):
    """Two tasks with the environment srun gives its tasks (no torchrun, no horovodrun): the
    engine finds its rank and world size from SLURM, Horovod's gloo rendezvous is hosted by
    rank 0, and a collective sums over both tasks."""
    if engine == "horovod" and _horovodrun() is None:
        pytest.skip("horovod.torch is not installed (scripts/install_horovod.sh builds it)")
    script = tmp_path / "task.py"
    script.write_text(SRUN_TASK)
    host = os.uname().nodename
    procs = []
    for r in range(2):
        env = dict(_env(), SLURM_JOB_ID=str(4000 + os.getpid() % 500 + (engine == "ddp")), SLURM_STEP_ID="0",
                   SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NODEID="0", SLURM_NTASKS="2",
                   SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2", SLURM_TASKS_PER_NODE="2",
                   SLURM_JOB_NODELIST=host, SLURMD_NODENAME=host)
        procs.append(subprocess.Popen([sys.executable, str(script), "auto" if engine == "horovod" else engine],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = sorted(next(l for l in out.splitlines() if l.startswith("RESULT")).split()[1:] for out, _ in outs)
    for r, res in enumerate(results):
        detected, name, rank, world, local, total = res
        assert (name, int(rank), int(world), int(local), float(total)) == (engine, r, 2, 2, 3.0)
        if engine == "horovod":
            assert detected == "horovod"  # auto under an srun step with several tasks
