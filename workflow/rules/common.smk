# Shared definitions: configuration (validated against the one schema), paths, the chunk
# plan known at parse time, per-stage configuration files (so that changing one stage's
# settings reruns that stage and what follows it, not the others).
import sys
from pathlib import Path

import yaml
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml", set_default=True)

from deephemnma import preprocess as _pp  # noqa: E402  (the package is installed in the environment)
from deephemnma.core.star import count_particles as _count_particles  # noqa: E402

OUT = config["outdir"].rstrip("/")
from snakemake.settings.types import DeploymentMethod  # noqa: E402

USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
REPO = Path(workflow.basedir)
if USE_CONDA:  # each rule's own environment (envs/*.yaml), the package from this repository
    PY = "python"
    DH = f"PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}} python -m deephemnma"
else:  # the interpreter running Snakemake, where deephemnma is installed (make install)
    PY = sys.executable
    DH = f"{PY} -m deephemnma"
SIMULATING = config["data"]["source"] == "simulate"


# ---------------------------------------------------------------- inputs and the chunk plan
def particles_star():
    if SIMULATING:
        return f"{OUT}/simulate/particles.star"
    if not config["data"]["particles"]:
        raise ValueError("data.source is 'star' but data.particles is not set (the path of your STAR file)")
    return config["data"]["particles"]


def ground_truth():
    if SIMULATING:
        return f"{OUT}/simulate/ground_truth.star"
    return config["data"]["ground_truth"]


def n_particles():
    if SIMULATING:
        return int(config["simulate"]["n_particles"])
    return _count_particles(particles_star())


CHUNKS = _pp.plan_chunks(n_particles(), config)  # known at parse time: no checkpoint needed
SET1 = [c["name"].split("/")[1] for c in CHUNKS if c["set"] == "set1"]  # align jobs
SET2 = [c["name"].split("/")[1] for c in CHUNKS if c["set"] == "set2"]  # predict shards (sorted)


def reference_file():
    return config["reference"]["path"] or f"{OUT}/reference/ak_open_4ake.pdb"


def evaluating():
    mode = config["workflow"]["evaluate"]
    return mode == "always" or (mode == "auto" and ground_truth() is not None)


# ------------------------------------------------------------------ per-stage configuration
# Each stage reads only these sections of the configuration (plus the seed); "a.b" is key b
# of section a alone (the outlier filter feeds training: a change of the landscape's grouping
# must not retrain the network).
STAGE_SECTIONS = {
    "nma": ["reference", "nma"],
    "simulate": ["simulate"],
    "preprocess": ["data", "preprocess"],
    "align": ["align"],
    "train": ["network"],
    "predict": ["network"],
    "filter": ["landscape.filter", "landscape.modes"],
    "landscape": ["landscape"],
    "reconstruct": ["reconstruct"],
    "report": ["landscape"],
}


def stage_config_text(stage):
    doc = {"seed": config["seed"]}
    for s in STAGE_SECTIONS[stage]:
        section, _, key = s.partition(".")
        if key:
            doc.setdefault(section, {})[key] = config[section][key]
        else:
            doc[section] = config[section]
    if stage == "train":
        doc["network"] = {**config["network"], "engine": config["workflow"]["train_engine"]}
    return yaml.safe_dump(doc, sort_keys=True)


def stage_config(stage):
    return f"{OUT}/config/{stage}.yaml"


def log_of(name):
    return f"{OUT}/logs/{name}.log"


def bench_of(name):
    return f"{OUT}/benchmarks/{name}.tsv"


rule stage_config:
    """One stage's settings; rewritten (and the stage rerun) only when they change."""
    output:
        f"{OUT}/config/{{stage}}.yaml",
    params:
        text=lambda w: stage_config_text(w.stage),
    wildcard_constraints:
        stage="|".join(STAGE_SECTIONS),
    localrule: True
    run:
        from deephemnma.core.fileio import atomic_write_text

        atomic_write_text(output[0], params.text)


def final_outputs():
    out = [
        f"{OUT}/landscape/landscape.star",
        f"{OUT}/groups/groups.json",
        f"{OUT}/animate/chimerax.cxc",
        f"{OUT}/nma/animate",
        f"{OUT}/report.html",
    ]
    if evaluating():
        out += [f"{OUT}/evaluate/hemnma/summary.json", f"{OUT}/evaluate/predicted/summary.json"]
    # Per-chunk results are products too: a deleted (or failed) chunk is redone, and what
    # depends on it after it (newer input), without touching the other chunks.
    out += [f"{OUT}/align/{c}.star" for c in SET1] + [f"{OUT}/predict/{c}.star" for c in SET2]
    return out
