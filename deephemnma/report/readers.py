"""What each stage's files say, as the results page needs it — the one place to adjust when
a stage changes what it writes.

Each reader takes a :class:`~.results.Results` and returns a plain dict, or ``None`` when
the stage's figure is not available (file absent, or written before the stage recorded it);
:mod:`.health` judges these dicts in words and :mod:`.build` shows them. Files and keys read:

- ``preprocess/preprocess.json``: ``polarity`` = {``invert``, ``setting`` (auto/true/false),
  ``decision``: the detector's record (``polarity`` white/dark/inconclusive, ``zscore``,
  ``threshold``, ``n_particles``, ``method``, ``evidence``, ``invert``;
  :meth:`deephemnma.core.polarity.PolarityDecision.as_dict`) or a sentence ("set in the
  configuration", "already preprocessed (white)")};
- ``align/hemnma.star``: ``_dhnmaFlag`` bits (:data:`FLAG_BITS`; the explorer names them too);
- ``filter/summary.json``: ``n_input``, ``n_kept``, ``threshold``,
  ``expected_kept_fraction_gaussian`` (top level, or under ``info``);
- ``network/summary.json``: a ``test`` block {``n``, ``errors`` {``angle_deg``, ``shift_A``,
  ``rmsd_A``, ``amplitude``}, ``baseline`` {same keys}, ``chance`` {``angle_deg``}} when
  present; else the best validation epoch (``best.val_angle_error_deg``, ``val_shift_mae_A``,
  ``val_amplitude_mae``) with ``mean_prediction_baseline`` {``angle``, ``shift``,
  ``amplitude``}. Chance for the angle is 90° (a constant or random orientation) unless given;
- ``predict/summary.json``: ``refinement`` = {``mode``, ``n``, ``fallback``,
  ``fallback_fraction``}, or the merged shard summaries (``settings.refine``, ``particles``,
  ``fallback``, ``fallback_fraction``); else the per-shard records ``predict/chunk_NNNN.json``
  (``particles``, ``refine``, ``fallback``) summed;
- ``maps/group_NN/summary.json``: ``resolution_fsc0143``, ``resolution_fsc05``,
  ``resolution_unmasked_fsc0143``, ``resolution_unmasked_fsc05``, ``n_particles``, ``sign``
  {``positive``, ``correlation_with_reference`` or ``centre_minus_outside``}, ``mask``
  {``kind``, ``volume_fraction``, ``reference_density_inside``, ``problems``, ``auto_mask``},
  ``images_negated``, ``ctf_states`` (older summaries: ``masked`` only);
- ``groups/groups.json`` (``n_particles``, ``n_groups``, ``n_dropped``, ``groups.{g}``),
  ``groups/groups.csv`` (``pcK_mean``); ``landscape/model.json`` (``columns``,
  ``components``, ``explained_variance_ratio``); ``evaluate/{hemnma,predicted}/summary.json``
  (``angle_err``, ``shift_err``, ``rmsd_amp``: {``mean``}).
"""
from __future__ import annotations

import numpy as np

from ..core.star import FLAG, FLAG_AT_BOUND, FLAG_BAD_IMAGE, FLAG_FALLBACK, FLAG_JUNK, FLAG_NOT_CONVERGED, FLAG_OUTLIER

#: ``_dhnmaFlag`` bits and their names (deephemnma.core.star FLAG_*)
FLAG_BITS = {FLAG_NOT_CONVERGED: "not converged", FLAG_JUNK: "junk", FLAG_BAD_IMAGE: "bad image",
             FLAG_AT_BOUND: "amplitude at bound", FLAG_OUTLIER: "outlier", FLAG_FALLBACK: "fell back to HEMNMA"}
#: the paper's angle metric for a constant or random orientation (DESIGN.md §3)
CHANCE_ANGLE_DEG = 90.0

PREPROCESS = "preprocess/preprocess.json"
HEMNMA = "align/hemnma.star"
FILTER = "filter/summary.json"
NETWORK = "network/summary.json"
PREDICT = "predict/summary.json"


def _num(v) -> float | None:
    """``v`` as a finite float, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        return None
    return float(v)


# ------------------------------------------------------------------------------ preprocess
def polarity(res) -> dict | None:
    """The contrast-polarity decision of preprocessing: ``{invert, setting, detected, zscore,
    threshold, n_particles, method, note}`` (``detected`` None when the polarity was set, not
    detected; ``note`` the stage's sentence then). None when not recorded."""
    s = res.json(PREPROCESS)
    p = (s or {}).get("polarity")
    if not isinstance(p, dict):
        return None
    d = p.get("decision")
    out = {"invert": p.get("invert") if isinstance(p.get("invert"), bool) else None, "setting": p.get("setting"),
           "detected": None, "zscore": None, "threshold": None, "n_particles": None, "method": None, "note": None}
    if isinstance(d, dict):
        out.update(detected=d.get("polarity"), zscore=_num(d.get("zscore")), threshold=_num(d.get("threshold")),
                   n_particles=d.get("n_particles"), method=d.get("method"))
    elif d is not None:
        out["note"] = str(d)
    return out


# ------------------------------------------------------------------------------ align, filter
def flag_fractions(flags) -> dict:
    """Fraction of particles carrying each ``_dhnmaFlag`` bit, and with none."""
    f = np.asarray(flags, dtype=np.int64)
    n = len(f)
    out = {"n": int(n), "none": float((f == 0).mean()) if n else None}
    out["bits"] = {name: float(((f & bit) != 0).mean()) for bit, name in FLAG_BITS.items()} if n else {}
    return out


def hemnma_flags(res) -> dict | None:
    """Flag fractions of image set 1's HEMNMA alignment (align/hemnma.star)."""
    t = res.star(HEMNMA)
    if t is None or FLAG not in t.columns:
        return None
    return flag_fractions(t[FLAG].fillna(0).to_numpy())


def filter_counts(res) -> dict | None:
    """``{n_input, n_kept, threshold, expected}`` of the outlier filter."""
    s = res.json(FILTER)
    if not isinstance(s, dict):
        return None
    info = s.get("info", s)
    if not info.get("n_input"):
        return None
    return {"n_input": int(info["n_input"]), "n_kept": int(info.get("n_kept", 0)), "threshold": s.get("threshold"),
            "expected": _num(info.get("expected_kept_fraction_gaussian"))}


# ------------------------------------------------------------------------------ network, predict
#: (key in the test block, key of the fallback, label, unit)
NETWORK_METRICS = (("angle_deg", "angle", "angle", "°"),
                   ("shift_A", "shift", "shift", " Å"),
                   ("rmsd_A", None, "atomic RMSD from the amplitudes", " Å"),
                   ("amplitude", "amplitude", "amplitude (mean abs)", ""))


def network_errors(res) -> dict | None:
    """The network's errors next to predicting the mean and chance: ``{what, metrics: [{label,
    unit, error, baseline, chance}]}``. The summary's held-out ``test`` block when present, else
    the best validation epoch; None without a summary or figures."""
    s = res.json(NETWORK)
    if not isinstance(s, dict):
        return None
    t = s.get("test")
    metrics = []
    if isinstance(t, dict) and isinstance(t.get("errors"), dict):
        err, base, chance = t["errors"], t.get("baseline") or {}, t.get("chance") or {}
        n = t.get("n")
        what = f"held-out test set ({n:,} particles)" if isinstance(n, int) else "held-out test set"
        for key, _, label, unit in NETWORK_METRICS:
            if key is not None and _num(err.get(key)) is not None:
                c = _num(chance.get(key)) if key in chance else (CHANCE_ANGLE_DEG if key == "angle_deg" else None)
                metrics.append({"label": label, "unit": unit, "error": _num(err[key]),
                                "baseline": _num(base.get(key)), "chance": c})
    else:
        best = s.get("best") or {}
        base = s.get("mean_prediction_baseline") or {}
        values = {"angle": best.get("val_angle_error_deg"), "shift": best.get("val_shift_mae_A"),
                  "amplitude": best.get("val_amplitude_mae")}
        epoch = s.get("best_epoch", best.get("epoch"))
        what = f"validation set (best epoch{f' {epoch}' if epoch is not None else ''}; the summary has no test block)"
        for _, key, label, unit in NETWORK_METRICS:
            if key is not None and _num(values.get(key)) is not None:
                metrics.append({"label": label, "unit": unit, "error": _num(values[key]),
                                "baseline": _num(base.get(key)), "chance": CHANCE_ANGLE_DEG if key == "angle" else None})
    return {"what": what, "metrics": metrics} if metrics else None


def _shard_refinement(res) -> dict | None:
    """The refinement summed over the per-shard records ``predict/chunk_NNNN.json``
    (``particles``, ``settings.refine``, ``fallback``) when there is no predict/summary.json."""
    d = res.path("predict")
    docs = [res.json(f"predict/{p.name}") for p in sorted(d.glob("chunk_*.json"))] if d.is_dir() else []
    docs = [x for x in docs if isinstance(x, dict) and "refine" in (x.get("settings") or {})
            and isinstance(x.get("particles"), int)]
    if not docs:
        return None
    modes = sorted({str(x["settings"]["refine"]) for x in docs})
    return {"mode": "/".join(modes), "n": sum(x["particles"] for x in docs),
            "fallback": sum(int(x.get("fallback") or 0) for x in docs), "fallback_fraction": None}


def refinement(res) -> dict | None:
    """``{mode, n, fallback, fallback_fraction}`` of the refinement of the network's answers:
    predict/summary.json's ``refinement`` block, else the per-shard records."""
    s = res.json(PREDICT)
    r = s.get("refinement") if isinstance(s, dict) else None
    if not isinstance(r, dict) and isinstance(s, dict) and "refine" in (s.get("settings") or {}):
        r = {"mode": s["settings"]["refine"], "n": s.get("particles"), "fallback": s.get("fallback"),
             "fallback_fraction": s.get("fallback_fraction")}  # the merged shard summaries (merge --summary)
    r = r if isinstance(r, dict) else _shard_refinement(res)
    if r is None:
        return None
    n, fb, frac = r.get("n"), r.get("fallback"), _num(r.get("fallback_fraction"))
    if frac is None and isinstance(n, int) and n > 0 and isinstance(fb, int):
        frac = fb / n
    return {"mode": r.get("mode"), "n": n, "fallback": fb, "fallback_fraction": frac}


# ------------------------------------------------------------------------------ maps
def _sign(s: dict) -> dict | None:
    sign = s.get("sign")
    if not isinstance(sign, dict) or not isinstance(sign.get("positive"), bool):
        return None
    if _num(sign.get("correlation_with_reference")) is not None:
        how = f"correlation with the reference {sign['correlation_with_reference']:+.2f}"
    elif _num(sign.get("centre_minus_outside")) is not None:
        how = f"centre minus outside {sign['centre_minus_outside']:+.3g}"
    else:
        how = ""
    return {"positive": sign["positive"], "how": how}


def _mask(s: dict) -> dict | None:
    m = s.get("mask")
    if not isinstance(m, dict) or not m.get("kind"):
        return None
    problems = list(m.get("problems") or []) + list((m.get("auto_mask") or {}).get("problems") or [])
    return {"kind": str(m["kind"]), "rejected": "rejected" in str(m["kind"]), "problems": problems,
            "volume_fraction": _num(m.get("volume_fraction", (m.get("auto_mask") or {}).get("volume_fraction"))),
            "reference_density_inside": _num(m.get("reference_density_inside"))}


def group_map(res, group: int, folder: str) -> dict:
    """What ``maps/<folder>/summary.json`` says of one group's map (None for what it lacks)."""
    s = res.json(f"maps/{folder}/summary.json") or {}
    out = {"group": group, "name": folder, "n_particles": s.get("n_particles")}
    for k in ("resolution_fsc0143", "resolution_fsc05", "resolution_unmasked_fsc0143", "resolution_unmasked_fsc05"):
        out[k] = _num(s.get(k))
    out["sign"], out["mask"] = _sign(s), _mask(s)
    if out["mask"] is None and isinstance(s.get("masked"), bool):  # summaries before the mask block
        # "yes": health.py says "used (kind not recorded)"
        out["mask"] = {"kind": "yes" if s["masked"] else "none", "rejected": False, "problems": [],
                       "volume_fraction": None, "reference_density_inside": None}
    out["images_negated"] = s.get("images_negated") if isinstance(s.get("images_negated"), bool) else None
    out["ctf_states"] = s.get("ctf_states")
    return out


# ------------------------------------------------------------------------------ groups, landscape, truth
def groups_doc(res) -> dict | None:
    """groups/groups.json."""
    s = res.json("groups/groups.json")
    return s if isinstance(s, dict) else None


def landscape_model(res) -> dict:
    """landscape/model.json ({} when absent)."""
    s = res.json("landscape/model.json")
    return s if isinstance(s, dict) else {}


def truth(res) -> list[dict]:
    """``[{who, angle, shift, rmsd}]`` against the ground truth (simulated data only)."""
    out = []
    for key, who in (("hemnma", "HEMNMA (image set 1)"), ("predicted", "network (image set 2)")):
        s = res.json(f"evaluate/{key}/summary.json")
        if not isinstance(s, dict):
            continue
        mean = {k: _num((s.get(k) or {}).get("mean")) if isinstance(s.get(k), dict) else None
                for k in ("angle_err", "shift_err", "rmsd_amp")}
        out.append({"who": who, "angle": mean["angle_err"], "shift": mean["shift_err"], "rmsd": mean["rmsd_amp"]})
    return out
