"""Normal-mode analysis: wall time and peak memory (each case in a fresh child process).

Cases (20 modes each, 2 threads unless --threads):
* ak_ca:        adenylate kinase 4AKE chain A, 214 Cα, full ENM, cutoff 12 Å
* ak_heavy:     the same, 1,656 heavy atoms, full ENM, cutoff 8 Å (the demo's setting)
* copies_ca_17k:    80 copies of the Cα chain side by side (17,120 atoms, one connected
                    network), RTB 20 residues/block, cutoff 20 Å — the paper's ribosome settings
* copies_heavy_17k: 10 copies of the heavy-atom chain (16,560 atoms), RTB 10 residues/block,
                    cutoff 8 Å — the defaults applied to a 17k-atom structure
* pseudoatoms_1ake: 1ake.mrc (64³, 2 Å/voxel) → pseudoatoms at the default settings, then modes
* --full-17k adds copies_heavy_17k with the full (non-RTB) ENM for comparison (minutes, GBs).

Run:  python bench/bench_nma.py [--repeats 3] [--threads 2] [--full-17k] [--name nma]
Writes bench/results/nma.json (or NAME.json). Figures taken while other jobs share the machine are noisy:
the JSON records the 1-minute load average at the start.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from common import run_measured, summary, write_result  # noqa: E402

AK = None
for cand in (os.environ.get("DEEPHEMNMA_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"):
    if cand and (Path(cand) / "adenylate_kinase" / "4ake.pdb").is_file():
        AK = Path(cand) / "adenylate_kinase"
        break

CHILD = r'''
import json, resource, sys, time
t_start = time.perf_counter()
import numpy as np
from deephemnma.core.structure import load_structure
from deephemnma.nma import compute_modes
case = json.loads(sys.argv[1]) if len(sys.argv) > 1 else json.loads({case!r})
a = load_structure(case["pdb"], chains=["A"], atoms=case["atoms"])
x = a.coords - a.coords.mean(0)
ri = a.residue_index()
copies = case.get("copies", 1)
if copies > 1:
    # copies on a cubic grid, spaced by a fraction of the chain's extent: neighbours
    # interpenetrate a little, so the network is one connected piece
    step = np.ptp(x, axis=0) * case["spacing"]
    nx = int(np.ceil(copies ** (1 / 3)))
    xs, ris, chs = [], [], []
    for c in range(copies):
        i, j, k = c % nx, (c // nx) % nx, c // (nx * nx)
        xs.append(x + step * np.array([i, j, k]))
        ris.append(ri + (ri.max() + 1) * c)
        chs.append(np.full(len(a), "C%d" % c))
    x, ri, ch = np.concatenate(xs), np.concatenate(ris), np.concatenate(chs)
else:
    ch = a.chain_id
t0 = time.perf_counter()
res = compute_modes(x, case["cutoff"], n_modes=case["n_modes"], method=case["method"],
                    rtb_block=case.get("rtb_block", 10), residue_index=ri, chain_id=ch)
t1 = time.perf_counter()
print(json.dumps({{"n_atoms": len(x), "method": res.method, "dof": res.info["dof"],
                  "n_springs": res.info["n_springs"], "n_blocks": res.info.get("n_blocks"),
                  "n_zero_modes": res.info["n_zero_modes"], "compute_s": t1 - t0,
                  "timing_s": res.info["timing_s"], "eigenvalue_7": float(res.eigenvalues[6]),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
'''

CHILD_MAP = r'''
import json, resource, time
import numpy as np
from deephemnma.nma.pseudoatoms import read_map, fit_pseudoatoms
from deephemnma.nma import compute_modes
t0 = time.perf_counter()
vol = read_map({path!r})
fit = fit_pseudoatoms(vol)
t1 = time.perf_counter()
cutoff = 3.0 * fit.info["volume_per_pseudoatom_A3"] ** (1 / 3)
res = compute_modes(fit.coords, cutoff, n_modes=20)
t2 = time.perf_counter()
print(json.dumps({{"n_pseudoatoms": fit.n_atoms, "relative_error": fit.error, "fit_s": t1 - t0,
                  "modes_s": t2 - t1, "compute_s": t2 - t0, "cutoff_A": cutoff,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
'''


def cases(full_17k: bool) -> dict:
    pdb = str(AK / "4ake.pdb")
    out = {
        "ak_ca": {"pdb": pdb, "atoms": "ca", "cutoff": 12.0, "n_modes": 20, "method": "full"},
        "ak_heavy": {"pdb": pdb, "atoms": "heavy", "cutoff": 8.0, "n_modes": 20, "method": "full"},
        "copies_ca_17k": {"pdb": pdb, "atoms": "ca", "copies": 80, "spacing": 0.8, "cutoff": 20.0,
                          "n_modes": 20, "method": "rtb", "rtb_block": 20},
        "copies_heavy_17k": {"pdb": pdb, "atoms": "heavy", "copies": 10, "spacing": 0.8, "cutoff": 8.0,
                             "n_modes": 20, "method": "rtb", "rtb_block": 10},
    }
    if full_17k:
        out["copies_heavy_17k_full"] = {**out["copies_heavy_17k"], "method": "full"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full-17k", action="store_true", help="also time the full ENM on 16,560 atoms")
    ap.add_argument("--name", default="nma", help="result name: bench/results/NAME.json (default nma)")
    args = ap.parse_args()
    if AK is None:
        sys.exit("bench_nma: ../shared/data/adenylate_kinase not found (set DEEPHEMNMA_SHARED_DATA)")
    env = {"PYTHONPATH": str(REPO), **{v: str(args.threads) for v in
                                       ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    figures: dict = {"threads": args.threads, "n_modes": 20}
    for name, case in cases(args.full_17k).items():
        reps = 1 if name.endswith("_full") else args.repeats
        runs = [run_measured(CHILD.format(case=json.dumps(case)), env=env) for _ in range(reps)]
        res = [r["result"] for r in runs]
        figures[name] = {
            **{k: res[0][k] for k in ("n_atoms", "method", "dof", "n_springs", "n_blocks", "n_zero_modes")},
            "settings": {k: v for k, v in case.items() if k != "pdb"},
            "process_wall_s": summary([r["wall_s"] for r in runs]),
            "compute_s": summary([x["compute_s"] for x in res]),
            "peak_rss_mb": max(x["peak_rss_mb"] for x in res),
            "timing_s_last": res[-1]["timing_s"],
        }
        print(name, json.dumps(figures[name]["compute_s"]), f"{figures[name]['peak_rss_mb']:.0f} MB", flush=True)
    if (AK / "1ake.mrc").is_file():
        runs = [run_measured(CHILD_MAP.format(path=str(AK / "1ake.mrc")), env=env) for _ in range(max(1, args.repeats - 1))]
        res = [r["result"] for r in runs]
        figures["pseudoatoms_1ake"] = {
            "n_pseudoatoms": res[0]["n_pseudoatoms"], "relative_error": res[0]["relative_error"],
            "cutoff_A": res[0]["cutoff_A"],
            "fit_s": summary([x["fit_s"] for x in res]), "modes_s": summary([x["modes_s"] for x in res]),
            "process_wall_s": summary([r["wall_s"] for r in runs]),
            "peak_rss_mb": max(x["peak_rss_mb"] for x in res),
        }
    target = figures["copies_heavy_17k"]
    notes = ("Targets: <= 60 s and <= 4 GB for ~17k atoms and 20 modes on 2 cores. compute_s = neighbour "
             "search + Hessian + eigensolver inside the child; process_wall_s adds interpreter start and imports. "
             f"copies_heavy_17k median {target['compute_s']['median']:.1f} s, peak {target['peak_rss_mb']:.0f} MB.")
    write_result(args.name, figures, notes=notes)


if __name__ == "__main__":
    main()
