"""Training throughput (images/s) of the three engines: one process vs 2 DDP / 2 Horovod ranks.

Each configuration trains the same small network (default resnet10, 64² toy particles,
batch 16 per rank) for a few epochs in fresh processes and reports the training-loop
throughput of the last epoch (``train_images_per_s`` in metrics: global images per second,
validation excluded). On a CPU node the ranks share the cores (threads per rank = cores /
ranks), so this measures the engines' overhead and scaling on one node, not GPU speed; on
a GPU node each rank gets its own GPU (``--device cuda``).

    python bench/bench_train_engines.py                 # CPU, single vs ddp vs horovod (2 ranks)
    python bench/bench_train_engines.py --device cuda --ranks 1 2 4 --arch resnet34 --box 128 --batch 64

Writes bench/results/network_train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

WORKER = r'''
import json, sys
from pathlib import Path
from deephemnma.network.train import TrainSettings, train
star, out, engine, cfg = sys.argv[1], Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
out.mkdir(parents=True, exist_ok=True)
s = TrainSettings.from_config({"seed": 0, "network": dict(cfg, recipe="fast", engine=engine, val_fraction=0.0, patience=0)})
r = train(star, out, s)
if r.engine.is_main:
    print(json.dumps({"images_per_s": [h["train_images_per_s"] for h in r.history], "world": r.engine.world_size}))
r.engine.close()
'''


def run(cmd, env):
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    lines = [l[l.index("{"):] for l in proc.stdout.splitlines() if "{" in l]  # horovodrun prefixes "[0]<stdout>:"
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet10")
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="per-rank batch")
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engines", nargs="+", default=["ddp", "horovod"])
    args = ap.parse_args()

    from deephemnma.network.toydata import make_toy_particles

    cores = len(os.sched_getaffinity(0))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cfg = {"arch": args.arch, "batch_size": args.batch, "epochs": args.epochs, "num_workers": 1,
           "device": args.device, "warmup_epochs": 0}
    figures = {"arch": args.arch, "box": args.box, "batch_per_rank": args.batch, "cores": cores,
               "device": args.device, "results": {}}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        star = make_toy_particles(tmp / "data", n=args.n, box=args.box, seed=1)
        worker = tmp / "worker.py"
        worker.write_text(WORKER)
        for threads in sorted({1, cores}):
            res = run([sys.executable, worker, star, tmp / f"single{threads}", "single", json.dumps(cfg)],
                      dict(env, DEEPHEMNMA_THREADS=str(threads), OMP_NUM_THREADS=str(threads)))
            figures["results"][f"single_{threads}thread"] = {"ranks": 1, "threads": threads,
                                                             "images_per_s": res["images_per_s"][-1],
                                                             "all_epochs": res["images_per_s"]}
            print("single", threads, figures["results"][f"single_{threads}thread"], flush=True)
        best_single = max(v["images_per_s"] for v in figures["results"].values())
        hvdrun = shutil.which("horovodrun", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
        for n in args.ranks:
            for eng in args.engines:
                if eng == "ddp":
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", n]
                elif hvdrun:
                    cmd = [hvdrun, "-np", n, "-H", f"localhost:{n}", "--gloo", sys.executable]
                else:
                    figures["results"][f"horovod_{n}"] = "horovod not installed"
                    continue
                res = run([*cmd, worker, star, tmp / f"{eng}{n}", eng, json.dumps(cfg)],
                          dict(env, DEEPHEMNMA_THREADS=str(cores)))
                figures["results"][f"{eng}_{n}"] = {"ranks": n, "images_per_s": res["images_per_s"][-1],
                                                    "speedup_vs_best_single": res["images_per_s"][-1] / best_single,
                                                    "all_epochs": res["images_per_s"]}
                print(eng, n, figures["results"][f"{eng}_{n}"], flush=True)
    write_result("network_train", figures,
                 "Global training images/s of the last epoch. CPU ranks share the node's cores "
                 "(threads per rank = cores / ranks). Taken on a shared machine (see loadavg).")


if __name__ == "__main__":
    main()
