"""The health panel: what in a results tree can be trusted, in words.

Each check judges what one stage wrote (read by :mod:`.readers`, the one place that knows the
files) and returns a :class:`Check`: a status — ``ok``, ``warn``, ``bad``, ``info`` (a fact
without a verdict) or ``na`` ("not available": the stage has not written that figure) — a
topic, one or two sentences, and the file it came from. The page never fails for want of a
file. The thresholds are in :data:`THRESHOLDS`.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import readers

THRESHOLDS = {
    "hemnma_unflagged_ok": 0.90, "hemnma_unflagged_warn": 0.70,
    "filter_kept_ok": 0.80,
    "network_learned": 0.5,    # error below this fraction of min(baseline, chance): learned
    "network_useless": 0.9,    # error above this fraction of min(baseline, chance): not learned
    "fallback_warn": 0.2, "fallback_bad": 0.5,
    "mask_top_in": 0.9,        # the report's own check (old summaries): top 1 % of density inside the mask
    "group_min_size": 100,
}


@dataclass
class Check:
    status: str   # ok | warn | bad | info | na
    topic: str
    text: str
    source: str = ""


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _range(values, fmt="{:.3g}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def _groups(gs) -> str:
    gs = sorted(gs)
    return ("group " if len(gs) == 1 else "groups ") + ", ".join(map(str, gs))


# ------------------------------------------------------------------------------ preprocess
def polarity_check(res) -> Check:
    """The contrast-polarity decision of preprocessing."""
    topic, src = "Contrast polarity", readers.PREPROCESS
    p = readers.polarity(res)
    if p is None:
        why = "there is no preprocess/preprocess.json" if res.json(src) is None else \
            "preprocess.json has no polarity record; it was written before the polarity was detected"
        return Check("na", topic, f"Not available: {why}.", src)
    done = {True: "inverted on reading", False: "kept as they were", None: "handled as recorded"}[p["invert"]]
    if p["detected"] is not None:
        z = f"z = {p['zscore']:+.1f}" if p["zscore"] is not None else "z not recorded"
        thr = f", |z| ≥ {p['threshold']:g} decides" if p["threshold"] is not None else ""
        n = f", {p['n_particles']:,} particles" if isinstance(p["n_particles"], int) else ""
        evidence = f"({z}{thr}{n}{'; ' + p['method'] if p['method'] else ''})"
        if p["detected"] not in ("white", "dark"):
            return Check("warn", topic, f"Detection was inconclusive {evidence}; images {done}.", src)
        consistent = p["invert"] is None or p["invert"] == (p["detected"] == "dark")
        text = (f"Detected from the data: the particles were {p['detected']} {evidence}; images {done}, "
                "so protein is white from here on.")
        if not consistent:
            return Check("bad", topic, text + " But the recorded inversion contradicts the detection.", src)
        return Check("ok", topic, text, src)
    note = p["note"] or "no detection recorded"
    setting = f" (data.invert_contrast: {str(p['setting']).lower()})" if p["setting"] is not None else ""
    return Check("info", topic, f"Not detected: {note}{setting}; images {done}. "
                 "The maps' sign below shows whether that was right.", src)


# ------------------------------------------------------------------------------ align, filter
def hemnma_check(res) -> Check:
    """Flag fractions of image set 1's HEMNMA alignment."""
    topic, src = "HEMNMA alignment (image set 1)", readers.HEMNMA
    ff = readers.hemnma_flags(res)
    if ff is None or not ff["n"]:
        return Check("na", topic, "Not available (no align/hemnma.star with _dhnmaFlag).", src)
    bits = ", ".join(f"{name} {_pct(v)}" for name, v in ff["bits"].items() if v > 0) or "none"
    ok = ff["none"]
    status = ("ok" if ok >= THRESHOLDS["hemnma_unflagged_ok"] else
              "warn" if ok >= THRESHOLDS["hemnma_unflagged_warn"] else "bad")
    text = (f"{_pct(ok)} of {ff['n']:,} particles aligned without a flag (flags: {bits}). "
            + ("These are the network's training labels." if status == "ok" else
               "Many flagged particles: check the reference, the mask radius and the contrast polarity."))
    return Check(status, topic, text, src)


def filter_check(res) -> Check:
    """How many HEMNMA particles the outlier filter kept as training labels."""
    topic, src = "Outlier filter", readers.FILTER
    c = readers.filter_counts(res)
    if c is None:
        return Check("na", topic, "Not available.", src)
    frac = c["n_kept"] / c["n_input"]
    exp = f"; {_pct(c['expected'])} expected for Gaussian amplitudes" if c["expected"] is not None else ""
    thr = c["threshold"] if c["threshold"] is not None else "?"
    return Check("ok" if frac >= THRESHOLDS["filter_kept_ok"] else "warn", topic,
                 f"Kept {c['n_kept']:,} of {c['n_input']:,} HEMNMA particles ({_pct(frac)}{exp}) as training "
                 f"labels (Mahalanobis distance ≤ {thr}).", src)


# ------------------------------------------------------------------------------ network, predict
def _metric_words(m: dict) -> tuple[str, str | None]:
    """('angle 90.8° (predicting the mean: 91.2°; chance ≈ 90°)', verdict or None)."""
    u = m["unit"]
    words = f"{m['label']} {m['error']:.3g}{u}"
    refs = []
    if m["baseline"] is not None:
        refs.append(f"predicting the mean: {m['baseline']:.3g}{u}")
    if m["chance"] is not None:
        refs.append(f"chance ≈ {m['chance']:.3g}{u}")
    if refs:
        words += f" ({'; '.join(refs)})"
    ref = min((v for v in (m["baseline"], m["chance"]) if v is not None), default=None)
    if not ref:
        return words, None
    r = m["error"] / ref
    return words, "ok" if r < THRESHOLDS["network_learned"] else "bad" if r > THRESHOLDS["network_useless"] else "warn"


def network_check(res) -> Check:
    """The network's errors against predicting the mean and chance."""
    topic, src = "Network (image set 2)", readers.NETWORK
    e = readers.network_errors(res)
    if e is None:
        why = "no network/summary.json" if res.json(src) is None else "no error figures in network/summary.json"
        return Check("na", topic, f"Not available ({why}).", src)
    parts, verdicts = [], []
    for m in e["metrics"]:
        words, verdict = _metric_words(m)
        parts.append(words)
        if verdict:
            verdicts.append((m["label"], verdict))
    bad = [k for k, v in verdicts if v == "bad"]
    status = "bad" if bad else "warn" if any(v == "warn" for _, v in verdicts) else "ok" if verdicts else "info"
    head = {"bad": f"Not learned: the {', '.join(bad)} prediction is no better than predicting the mean or chance, "
                   "so image set 2's values (and the landscape built on them) cannot be trusted.",
            "warn": "Partly learned: errors are below the baseline but not far below it.",
            "ok": "Learned: errors are well below predicting the mean and chance.",
            "info": "No baseline to compare with."}[status]
    return Check(status, topic, f"{head} Errors on the {e['what']}: {'; '.join(parts)}.", src)


def refinement_check(res) -> Check:
    """Fraction of the network's answers that fell back to full HEMNMA after refinement."""
    topic, src = "Refinement of predictions", readers.PREDICT
    r = readers.refinement(res)
    if r is None:
        return Check("na", topic, "Not available (no refinement record in predict/summary.json).", src)
    if str(r["mode"]).lower() in ("none", "off", "false"):
        return Check("info", topic, f"The network's answers were used as they are (refinement: {r['mode']}).", src)
    frac = r["fallback_fraction"]
    if frac is None:
        return Check("na", topic, f"Refinement {r['mode'] or ''} ran; no fallback figures recorded.".replace("  ", " "),
                     src)
    n = f" of {r['n']:,}" if isinstance(r["n"], int) else ""
    status = "ok" if frac < THRESHOLDS["fallback_warn"] else "warn" if frac < THRESHOLDS["fallback_bad"] else "bad"
    return Check(status, topic, f"{_pct(frac)}{n} predicted particles scored too low after refinement"
                 f"{' (' + str(r['mode']) + ')' if r['mode'] else ''} and fell back to full HEMNMA.", src)


# ------------------------------------------------------------------------------ groups, maps
def groups_check(res) -> Check:
    """Number and sizes of the landscape groups."""
    topic, src = "Groups", "groups/groups.json"
    s = readers.groups_doc(res)
    if s is None:
        return Check("na", topic, "Not available.", src)
    sizes = [g.get("size", 0) for g in s.get("groups", {}).values()]
    n, dropped = s.get("n_particles", sum(sizes)), s.get("n_dropped", 0)
    if not sizes:
        return Check("warn", topic, "No groups.", src)
    small = min(sizes) < THRESHOLDS["group_min_size"]
    text = f"{s.get('n_groups', len(sizes))} groups of {_range(sizes, '{:,}')} particles ({dropped:,} of {n:,} in no group)."
    if small:
        text += f" A group under {THRESHOLDS['group_min_size']} particles gives a noisy map."
    return Check("warn" if small else "ok", topic, text, src)


def _mask_words(maps: list[dict]) -> tuple[list[str], bool]:
    """Sentences on the masks and whether one is a caution."""
    kinds: dict[str, list[int]] = {}
    for m in maps:
        if m.get("mask"):
            kinds.setdefault(m["mask"]["kind"], []).append(m["group"])
    if not kinds:
        return [], False
    names = {"auto": "automatic", "sphere": "soft sphere", "none": "none (unmasked FSC)",
             "yes": "used (kind not recorded)"}
    bits, caution = [], False
    for kind, gs in kinds.items():
        if "rejected" in kind:
            caution = True
            why = sorted({p for m in maps if m["group"] in gs for p in m["mask"]["problems"]})
            bits.append(f"soft sphere in {_groups(gs)} because the automatic mask was rejected"
                        + (f" ({'; '.join(why[:3])})" if why else "")
                        + ": the FSC there is honest but the map is likely noisy")
        else:
            bits.append(f"{names.get(kind, kind)} ({_groups(gs)})" if len(kinds) > 1 else names.get(kind, kind))
    inside = [m["mask"]["reference_density_inside"] for m in maps
              if m.get("mask") and m["mask"].get("reference_density_inside") is not None]
    tail = f"; {_range([100 * v for v in inside], '{:.0f}')} % of the reference's density inside" if inside else ""
    return [f"Masks: {', '.join(bits)}{tail}."], caution


def maps_check(res, maps: list[dict]) -> Check:
    """Resolutions, sign and mask of the group maps (``maps``: :func:`readers.group_map`
    entries, with ``page_check`` where the report had to check the map itself)."""
    topic, src = "Group maps", "maps/group_NN/summary.json"
    if not maps:
        return Check("na", topic, "Not available (no maps/group_NN/).", src)
    res143 = [m["resolution_fsc0143"] for m in maps if m.get("resolution_fsc0143")]
    unm = [m["resolution_unmasked_fsc0143"] for m in maps if m.get("resolution_unmasked_fsc0143")]
    text = [f"{len(maps)} map(s)" + (f" at {_range(res143)} Å (half-map FSC 0.143)" if res143 else "")
            + (f"; unmasked {_range(unm)} Å" if unm else "") + "."]
    status = "ok"
    signs = {m["group"]: m["sign"] for m in maps if m.get("sign")}
    page = {m["group"]: m["page_check"] for m in maps if not m.get("sign") and m.get("page_check")}
    negative = sorted([g for g, s in signs.items() if not s["positive"]] +
                      [g for g, c in page.items() if c.get("positive") is False])
    if negative:
        status = "bad"
        text.append(f"{_groups(negative).capitalize()} negative where the molecule is: the contrast polarity is "
                    "probably inverted (data.invert_contrast).")
    elif signs or page:
        hows = [s["how"] for s in signs.values() if s["how"]]
        text.append("Density positive where the molecule is" + (f" ({'; '.join(hows[:2])}"
                                                                 f"{' …' if len(hows) > 2 else ''})" if hows else "") + ".")
    pol = readers.polarity(res)
    negated = {m["group"]: m["images_negated"] for m in maps if m.get("images_negated") is not None}
    if pol is not None and pol["invert"] is not None:
        odd = sorted(g for g, v in negated.items() if v != pol["invert"])
        if odd:
            status = "bad"
            text.append(f"{_groups(odd).capitalize()} reconstructed from {'non-' if pol['invert'] else ''}negated "
                        f"original images although preprocessing {'inverted' if pol['invert'] else 'kept'} the contrast.")
    words, caution = _mask_words(maps)
    text += words
    outside = sorted(g for g, c in page.items() if (c.get("top_density_in_mask") or 1) < THRESHOLDS["mask_top_in"])
    if outside:
        caution = True
        text.append(f"In {_groups(outside)} strong density lies outside the mask.")
    if page:
        text.append("(Sign and mask checked by the report on the binned maps: these summaries predate the "
                    "reconstruct stage's own checks.)")
    if caution and status == "ok":
        status = "warn"
    return Check(status, topic, " ".join(text), src)


# ------------------------------------------------------------------------------ jobs, truth
def jobs_check(failures: dict | None) -> Check:
    """Failed and retried jobs in Snakemake's logs (see results.job_failures)."""
    topic, src = "Workflow jobs", ".snakemake/log/"
    if failures is None or not failures["runs"]:
        return Check("na", topic, "Not available (no Snakemake log of these results found).", src)
    runs, fails = failures["runs"], failures["failures"]
    if not fails:
        return Check("ok", topic, f"No job failed in the {len(runs)} logged run(s).", src)

    def names(fs):
        return ", ".join(sorted({f["rule"] + (f" ({f['wildcards']})" if f["wildcards"] else "") for f in fs})[:8])

    open_ = [f for f in runs[-1]["failures"] if not f["succeeded_later"]]
    if open_:
        return Check("bad", topic, f"In the latest run {len(open_)} job(s) failed and were not redone: "
                     f"{names(open_)}. Rerun the workflow: it redoes only what failed.", src)
    retried = sum(f["retried"] for f in fails)
    return Check("warn", topic, f"{len(fails)} job failure(s) in {len(runs)} logged run(s) "
                 f"({names(fails)}), all redone since ({retried} by an automatic retry); the outputs are those of "
                 "the successful attempts.", src)


def truth_check(res) -> Check | None:
    """Accuracy against the ground truth (simulated data only); None when there is none."""
    rows = readers.truth(res)
    if not rows:
        return None
    parts = []
    for r in rows:
        bits = [f"angle {r['angle']:.3g}°" if r["angle"] is not None else None,
                f"shift {r['shift']:.3g} Å" if r["shift"] is not None else None,
                f"atomic RMSD from the amplitudes {r['rmsd']:.3g} Å" if r["rmsd"] is not None else None]
        parts.append(f"{r['who']}: " + (", ".join(b for b in bits if b) or "no figures"))
    return Check("info", "Against the ground truth (simulation)", "; ".join(parts) + ".", "evaluate/*/summary.json")


def all_checks(res, maps: list[dict], failures: dict | None) -> list[Check]:
    """Every check, in the order of the workflow."""
    checks = [polarity_check(res), hemnma_check(res), filter_check(res), network_check(res), refinement_check(res),
              groups_check(res), maps_check(res, maps), jobs_check(failures)]
    truth = truth_check(res)
    return checks + ([truth] if truth else [])
