"""Contrast-polarity detection: accuracy on independently simulated particles.

Particles of adenylate kinase (4AKE chain A) are rendered by tests/_independent_sim.py (its
own PDB parser, atom projector and CTF written from RELION's formula; nothing from the
package) with uniform random orientations, ±3 px centre offsets, mean defocus uniform in
0.5–2.5 µm, up to 500 Å astigmatism, 300 kV, Cs 2.7 mm, Q0 0.1, white Gaussian noise at a
given SNR (signal variance over the box / noise variance) and RELION's background
normalisation, in either polarity, raw or phase flipped.

Main grid: ``--sets`` independent sets (own orientations, shifts, defoci, noise) × SNR
{0.05, 0.1, 0.3} × polarity {white, dark} × {raw, phase flipped}, ``--n`` particles at 64²
(1.3 Å/px), plus ``--sets-128`` sets at 128² (0.65 Å/px). For one set index the noise-free
particles are shared between the SNR / polarity / raw-flipped conditions (each condition
draws its own noise), so the sets of one condition are independent of each other.

Each set is scored by the package's detector (deephemnma.core.polarity, the true model as
reference) and by alternatives on the same images: the detector with a uniform-sphere blob
(radius √(5/3)·Rg of the model, ×0.5, ×2, and the default 0.3·box), the real-space central
excess after phase flipping (mean inside the particle's circle − mean outside; method (c)),
the same without the CTF (naive), and on a few sets the HEMNMA-like best-template score of
both polarities (the align module's template search; method (b)). Every method decides
with the same rule: one-sample t over particles, |z| ≥ 5.

Below the specification (64², ``--low-snr-sets`` sets): SNR 0.001, 0.0003, 0.0001, every
method, to see where each stops deciding and whether any decides wrongly.

Stress conditions (SNR 0.05 unless named): 100 particles; SNR 0.02 and 0.01; coloured noise;
±8 px centre offsets; defocus given to the detector wrong by N(0, 1000 Å); phase plate
(90°, Q0 0.07); CTF-premultiplied images; the pixel size given 1.5× too large (wrong blob
size and CTF); 40 % of the boxes empty (noise only); pure noise (must be inconclusive).

Writes bench/results/polarity.json.   python bench/bench_polarity.py [--sets 20] [--n 300]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import write_result  # noqa: E402
from deephemnma.core.ctf import CTFParams  # noqa: E402
from deephemnma.core.polarity import DEFAULT_THRESHOLD, detect_polarity  # noqa: E402
sys.path.insert(0, str(ROOT / "tests"))
import _independent_sim as sim  # noqa: E402

SNRS = (0.05, 0.1, 0.3)
LOW_SNRS = (0.001, 0.0003, 0.0001)
POLS = ("white", "dark")
VARIANTS = ("raw", "flipped")
Z = DEFAULT_THRESHOLD


def ctf_params(s) -> CTFParams:
    c = s.ctf
    return CTFParams(c["defocus_u"], c["defocus_v"], c["defocus_angle"], c["voltage"], c["cs"], c["amp_contrast"],
                     c["phase_shift"], c["bfactor"], 1.0)


def ttest(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(ddof=1)
    return float(x.mean() / (sd / math.sqrt(len(x)))) if sd > 0 else 0.0


def decide(z: float) -> str:
    return "white" if z >= Z else "dark" if z <= -Z else "inconclusive"


# --------------------------------------------------------------------------- alternatives
def central_excess_z(images, ctf_imgs, flip: bool, radius_px: float) -> float:
    """Method (c): phase flip (when ``flip``), then mean inside the circle − mean outside."""
    x = images.astype(np.float64)
    if flip:
        x = sim.fourier_filter(x, np.sign(ctf_imgs))
    D = x.shape[-1]
    g = np.arange(D) - D // 2
    inside = (g[None, :] ** 2 + g[:, None] ** 2) <= radius_px ** 2
    return ttest(x[:, inside].mean(1) - x[:, ~inside].mean(1))


class TemplateSearch:
    """Method (b): best normalised correlation over the align module's search grid (15°,
    search box 32, shifts ±1 search pixel) for the image and its negative."""

    def __init__(self, coords, weights, box, pixel_size):
        from deephemnma.align.levels import Level
        from deephemnma.align.model import ElasticModel
        from deephemnma.align.search import TemplateBank

        model = ElasticModel(coords, weights, 1.5, np.array([7]), np.zeros((1, len(coords), 3)))  # rigid
        self.level = Level.make(32, box, pixel_size)
        self.bank = TemplateBank(model, self.level, 15.0, np.zeros((1, 1)))
        self.max_shift = self.level.pixel_size

    def z(self, s, mode: str) -> float:
        from deephemnma.align.levels import LevelData, ctf_for_level

        F = torch.fft.rfft2(torch.as_tensor(s.images))
        c = ctf_for_level(ctf_params(s), mode, self.level, len(s))
        best = []
        for sign in (1.0, -1.0):
            data = LevelData.build(sign * F, c, self.level)
            best.append(self.bank.search(data, self.max_shift, 1).score[:, 0])
        return ttest(best[0] - best[1])


# --------------------------------------------------------------------------- bench
def run_detector(s, ref, mode="flipped", ctf=None):
    t0 = time.perf_counter()
    d = detect_polarity(s.images, ctf if ctf is not None else ctf_params(s), s.pixel_size, ref,
                        phase_flipped=(mode == "flipped"), ctf_premultiplied=(mode == "premultiplied"),
                        n_particles=len(s))
    return d, time.perf_counter() - t0


def summarise(rows, key="z"):
    out = {}
    for r in rows:
        out.setdefault(r["cond"], []).append(r)
    res = {}
    for cond, rs in out.items():
        zs = np.array([r[key] for r in rs])
        truth = rs[0]["truth"]
        dec = [decide(z) for z in zs]
        res[cond] = {
            "n_sets": len(rs),
            "fraction_right": float(np.mean([d == truth for d in dec])) if truth else None,
            "fraction_wrong": float(np.mean([d not in (truth, "inconclusive") for d in dec])) if truth else
            float(np.mean([d != "inconclusive" for d in dec])),
            "fraction_inconclusive": float(np.mean([d == "inconclusive" for d in dec])),
            "z_min": float(zs.min()), "z_median": float(np.median(zs)), "z_max": float(zs.max()),
            "abs_z_min": float(np.abs(zs).min()),
        }
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, default=20)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--sets-128", type=int, default=4)
    ap.add_argument("--stress-sets", type=int, default=5)
    ap.add_argument("--low-snr-sets", type=int, default=5, help="sets per condition at SNR 0.001, 0.0003, 0.0001")
    ap.add_argument("--search-sets", type=int, default=2, help="sets per condition for method (b) (slow)")
    ap.add_argument("--name", default="polarity")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    coords, weights = sim.read_pdb_atoms()
    coords = sim.centred(coords, weights)

    class Ref:  # the reference model as the detector receives it (coords + weights)
        pass

    ref = Ref()
    ref.coords, ref.weights = coords, weights
    rg = math.sqrt((weights * (coords ** 2).sum(1)).sum() / weights.sum())
    r_eq = math.sqrt(5 / 3) * rg
    templates = {"atoms": ref, "sphere": r_eq, "sphere_x0.5": 0.5 * r_eq, "sphere_x2": 2 * r_eq, "default": None}
    rows, times, times_sphere = [], {}, []
    search_rows = []
    search = {}

    def seed_of(*parts):
        return int(np.random.SeedSequence([zlib.crc32(str(p).encode()) for p in parts]).generate_state(1)[0])

    def grid(box, px, n_sets, tag, with_alternatives=True, search_sets=0, snrs=SNRS, pols=POLS, seed0=0):
        for k in range(n_sets):
            cs = sim.simulate_clean(a.n, box, px, seed=10_000 * box + k + seed0)
            ctf_imgs = cs.ctf_images()
            for snr in snrs:
                for pol in pols:
                    for var in VARIANTS:
                        s = sim.add_noise(cs, snr, pol, phase_flipped=(var == "flipped"),
                                          seed=seed_of(tag, k, snr, pol, var))
                        cond = f"{tag} snr={snr} {pol} {var}"
                        row = {"cond": cond, "truth": pol, "set": k}
                        for name, t in templates.items():
                            if name != "atoms" and not with_alternatives:
                                continue
                            d, dt = run_detector(s, t, var)
                            row["z" if name == "atoms" else f"z_{name}"] = d.zscore
                            if name == "atoms":
                                times.setdefault(f"{box}²", []).append(dt)
                                row["profile_correlation"] = d.evidence["profile_correlation"]
                            elif name == "sphere":
                                times_sphere.append(dt)
                        if with_alternatives:
                            rpx = r_eq / px
                            row["z_central_excess"] = central_excess_z(s.images, ctf_imgs, var == "raw", rpx)
                            row["z_naive_excess"] = central_excess_z(s.images, ctf_imgs, False, rpx)
                        rows.append(row)
                        if k < search_sets:
                            if box not in search:
                                search[box] = TemplateSearch(coords, weights, box, px)
                            t0 = time.perf_counter()
                            z = search[box].z(s, "phase_flipped" if var == "flipped" else "raw")
                            search_rows.append({"cond": cond, "truth": pol, "set": k, "z": z,
                                                "seconds": time.perf_counter() - t0})
            print(f"{tag} set {k + 1}/{n_sets} done, {time.perf_counter() - t_start:.0f} s", flush=True)

    grid(64, 1.3, a.sets, "64px", True, a.search_sets)
    grid(128, 0.65, a.sets_128, "128px", False)
    # below the specification, to see where each method stops deciding (and whether any errs)
    grid(64, 1.3, a.low_snr_sets, "64px-low", True, a.search_sets, snrs=LOW_SNRS, seed0=5000)

    # ---- stress conditions (64², SNR 0.05 unless named)
    stress = []
    for k in range(a.stress_sets):
        base = sim.simulate_clean(a.n, 64, 1.3, seed=900_000 + k)
        few = sim.CleanSet(base.clean[:100], base.pixel_size, {kk: (v[:100] if isinstance(v, np.ndarray) else v)
                                                               for kk, v in base.ctf.items()},
                           base.eulers[:100], base.origins_angst[:100], base.info)
        far = sim.simulate_clean(a.n, 64, 1.3, max_shift_px=8.0, seed=910_000 + k)
        pp = sim.simulate_clean(a.n, 64, 1.3, phase_shift=90.0, amp_contrast=0.07, seed=920_000 + k)
        junk = sim.CleanSet(base.clean * (np.arange(a.n) % 5 >= 2)[:, None, None], base.pixel_size, base.ctf,
                            base.eulers, base.origins_angst, base.info)   # noise σ set by the full signal
        fy = np.fft.fftfreq(64)
        kk = np.sqrt(fy[None, :] ** 2 + fy[:, None] ** 2)
        colour = 1.0 / (0.02 + kk)                               # strong low-frequency noise (~1/k amplitude)
        for pol in POLS:
            for var in VARIANTS:
                fl = var == "flipped"
                sd = seed_of("stress", k, pol, var)
                cases = {
                    "100 particles": (sim.add_noise(few, 0.05, pol, fl, seed=sd), None),
                    "snr=0.02": (sim.add_noise(base, 0.02, pol, fl, seed=sd + 1), None),
                    "snr=0.01": (sim.add_noise(base, 0.01, pol, fl, seed=sd + 2), None),
                    "coloured noise": (sim.add_noise(base, 0.05, pol, fl, noise_filter=colour, seed=sd + 3), None),
                    "shifts ±8 px": (sim.add_noise(far, 0.05, pol, fl, seed=sd + 4), None),
                    "phase plate 90°, Q0 0.07": (sim.add_noise(pp, 0.05, pol, fl, seed=sd + 5), None),
                }
                s = sim.add_noise(base, 0.05, pol, fl, seed=sd + 6)
                rng = np.random.default_rng(sd)
                wrong = ctf_params(s)
                err = rng.normal(0, 1000.0, len(s))
                wrong.defocus_u = wrong.defocus_u + err
                wrong.defocus_v = wrong.defocus_v + err
                cases["defocus error σ 1000 Å"] = (s, wrong)
                s2 = sim.SimSet(s.images, s.pixel_size * 1.5, s.ctf, s.eulers, s.origins_angst, pol, fl, 0.05, 0.0)
                cases["pixel size given 1.5× too large"] = (s2, None)
                cases["40% empty boxes"] = (sim.add_noise(junk, 0.05, pol, fl, seed=sd + 7), None)
                for name, (ss, ctf) in cases.items():
                    d, _ = run_detector(ss, ref, var, ctf)
                    stress.append({"cond": f"{name} {pol} {var}", "truth": pol, "set": k, "z": d.zscore})
            if True:
                s = sim.add_noise(base, 0.05, pol, premultiplied=True, seed=seed_of("premult", k, pol))
                d, _ = run_detector(s, ref, "premultiplied")
                stress.append({"cond": f"premultiplied {pol}", "truth": pol, "set": k, "z": d.zscore})
        for var in VARIANTS:
            for j in range(4):
                s = sim.add_noise(base, 0.05, "white", var == "flipped", signal_scale=0.0,
                                  seed=seed_of("noise", k, var, j))
                d, _ = run_detector(s, ref, var)
                stress.append({"cond": f"pure noise {var}", "truth": None, "set": k, "z": d.zscore})
        print(f"stress set {k + 1}/{a.stress_sets} done, {time.perf_counter() - t_start:.0f} s", flush=True)

    # ---- one call as preprocess would make it: a RELION 3.1 STAR + stack on disk, 500 of 1,000 sampled
    import tempfile

    from deephemnma.core.polarity import detect_polarity_star

    with tempfile.TemporaryDirectory() as tmp:
        big = sim.add_noise(sim.simulate_clean(1000, 128, 0.65, seed=990_001), 0.05, "dark", seed=990_002)
        star = sim.write_relion(big, Path(tmp) / "particles.star")
        t0 = time.perf_counter()
        d = detect_polarity_star(star, ref, n_particles=500)
        star_call = {"seconds": time.perf_counter() - t0, "box": 128, "n_in_file": 1000,
                     "n_used": d.n_particles, "truth": "dark", "decision": d.polarity, "z": d.zscore,
                     "summary": d.summary()}

    # ---- figures
    main_table = summarise(rows)
    alt = {}
    for key in ["z_sphere", "z_sphere_x0.5", "z_sphere_x2", "z_default", "z_central_excess", "z_naive_excess"]:
        alt[key[2:]] = summarise([dict(r, z=r[key]) for r in rows if key in r])
    figures = {
        "method": "deephemnma.core.polarity.detect_polarity (ctf-blob-ttest), reference = the true atomic model",
        "threshold_abs_z": Z,
        "n_particles_per_set": a.n,
        "seconds_per_call": {**{f"median {b}, {a.n} particles in memory": float(np.median(t))
                                for b, t in times.items()},
                             "median 64², sphere reference": float(np.median(times_sphere)),
                             "detect_polarity_star, raw 128² dark, SNR 0.05": star_call},
        "detector": main_table,
        "alternatives_same_sets": alt,
        "template_search_method_b": {"summary": summarise(search_rows),
                                     "seconds_per_set_median": float(np.median([r["seconds"] for r in search_rows]))
                                     if search_rows else None},
        "stress": summarise(stress),
        "total_seconds": time.perf_counter() - t_start,
    }
    notes = ("Independent simulator tests/_independent_sim.py. For one set index the noise-free particles are "
             "shared between conditions (own noise per condition); sets within a condition are independent. "
             "fraction_right: decision == truth; fraction_wrong: the opposite polarity decided.")
    write_result(a.name, figures, notes)
    raw = {"rows": rows, "template_search_rows": search_rows, "stress_rows": stress}
    import json

    (ROOT / "bench" / "results" / f"{a.name}_rows.json").write_text(json.dumps(raw, default=float) + "\n")


if __name__ == "__main__":
    main()
