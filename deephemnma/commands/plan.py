"""``deephemnma plan``: what a run of N particles costs, per rule, before it runs."""
from __future__ import annotations

import json
import sys

NAME = "plan"
ORDER = 6
HELP = "expected jobs, CPU/GPU-hours, disk, memory and wall time of a run of N particles"
DESCRIPTION = (
    "Print, per rule of the workflow, the expected number of jobs, CPU-hours, GPU-hours, disk\n"
    "(GB) and peak memory of one job for a run of --particles N at processing box --box, and\n"
    "its wall time on a cluster of --nodes × --cores-per-node (and --gpus-per-node), from the\n"
    "measured cost per particle of each rule: bench/results/scale.json when present (the\n"
    "whole workflow measured by bench/bench_scale.py), else built-in figures, each with its\n"
    "source. The chunk plan is the workflow's (preprocess.chunk_size, set2_chunk_size,\n"
    "set2_max_chunks of the configuration). Formulas: deephemnma/plan.py. GPU time is CPU\n"
    "time / --gpu-speedup, an assumption until a GPU run measures it."
)
EXAMPLES = [
    "deephemnma plan --particles 1000000 --box 128",
    "deephemnma plan --particles 1000000 --box 128 --set1 20000 --nodes 10 --cores-per-node 32 --gpus-per-node 4",
    "deephemnma plan --particles 100000 --box 64 --original-box 128 --json",
]


def add_arguments(p) -> None:
    p.add_argument("--particles", type=int, required=True, metavar="N", help="particles in the data set")
    p.add_argument("--box", type=int, required=True, metavar="B", help="processing box (preprocess.box), pixels")
    p.add_argument("--original-box", type=int, metavar="D", help="box of the original images (default 2 × --box)")
    p.add_argument("--set1", type=int, metavar="N1", help="image set 1 (default: preprocess.set1_size)")
    p.add_argument("--groups", type=int, default=10, metavar="G", help="landscape groups reconstructed (default 10)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--cores-per-node", type=int, default=32, help="CPU cores per node (default 32)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0: everything on CPU)")
    p.add_argument("--gpu-speedup", type=float, default=50.0,
                   help="one GPU's speed on train/predict over one CPU core (default 50; an assumption)")
    p.add_argument("--costs", metavar="JSON", help="cost table: a bench_scale result (default bench/results/scale.json)")
    p.add_argument("--simulate", action="store_true", help="include the simulate rule (synthetic data)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def default_log(args):
    return None


def run(args, config: dict) -> int:
    from ..core.errors import ConfigError
    from ..plan import Cluster, Run, format_plan, load_costs, plan, totals, train_images
    from ..preprocess import PreprocessSettings

    s = PreprocessSettings.from_config(config)
    if args.original_box is not None and args.original_box < 1:
        raise ConfigError(f"--original-box must be ≥ 1, got {args.original_box}")
    set1 = args.set1 if args.set1 is not None else (s.set1_size if s.set1_size is not None else args.particles)
    if s.set1_fraction is not None and args.set1 is None:
        set1 = int(round(s.set1_fraction * args.particles))
    run_ = Run(n=args.particles, box=args.box, box_in=args.original_box, set1=set1, chunk_size=s.chunk_size,
               set2_chunk_size=s.set2_chunk_size, set2_max_chunks=s.set2_max_chunks, groups=args.groups,
               train_images=train_images(config, set1))
    cluster = Cluster(nodes=args.nodes, cores_per_node=args.cores_per_node, gpus_per_node=args.gpus_per_node,
                      gpu_speedup=args.gpu_speedup)
    costs, source = load_costs(args.costs)
    rows = plan(run_, cluster, costs, simulate=args.simulate)
    if args.json:
        json.dump({"run": {"particles": run_.n, "box": run_.box, "original_box": run_.box_in, "set1": run_.set1,
                           "chunk_sizes": list(run_.chunk_sizes())},
                   "cluster": vars(cluster), "costs": source, "rules": rows, "total": totals(rows)},
                  sys.stdout, indent=1)
        print()
    else:
        print(format_plan(run_, cluster, rows, source))
    return 0
