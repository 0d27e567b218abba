# Shared definitions: configuration (validated against the one schema), paths, the chunk
# plan known at parse time, per-stage configuration files (so that changing one stage's
# settings reruns that stage and what follows it, not the others).
import sys
from pathlib import Path

import yaml
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml", set_default=True)
from deephemnma.core.config import resolve_for_workflow  # noqa: E402

config.update(resolve_for_workflow(config))  # e.g. workflow.train_engine auto → horovod / ddp / single

from deephemnma import preprocess as _pp  # noqa: E402  (the package is installed in the environment)
from deephemnma.commands import stages as _stages  # noqa: E402
from deephemnma.core.star import count_particles as _count_particles  # noqa: E402

OUT = config["outdir"].rstrip("/")
# Each stage declares, in its command module (STAGE), the configuration it reads and its
# results folder; its settings file <outdir>/config/<stage>.yaml holds exactly that part of the
# configuration, so that changing one stage's settings reruns that stage and what follows it.
STAGES = _stages()
R = {name: f"{OUT}/{st.results}" for name, st in STAGES.items() if st.results}  # results folders
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
        return f"{R['simulate']}/particles.star"
    if not config["data"]["particles"]:
        raise ValueError("data.source is 'star' but data.particles is not set (the path of your STAR file)")
    return config["data"]["particles"]


def ground_truth():
    if SIMULATING:
        return f"{R['simulate']}/ground_truth.star"
    return config["data"]["ground_truth"]


def n_particles():
    if SIMULATING:
        return int(config["simulate"]["n_particles"])
    return _count_particles(particles_star())


N_PARTICLES = n_particles()
CHUNKS = _pp.plan_chunks(N_PARTICLES, config)  # known at parse time: no checkpoint needed
SET1 = [c["name"].split("/")[1] for c in CHUNKS if c["set"] == "set1"]  # align jobs
SET2 = [c["name"].split("/")[1] for c in CHUNKS if c["set"] == "set2"]  # predict shards (sorted)


# ------------------------------------------------------------------ resources follow the data
# Each job's mem_mb and runtime (minutes) come from the formulas of deephemnma/plan.py (one
# place, documented there) with this run's N, boxes, chunk sizes and training length, and the
# per-particle costs measured by bench/bench_scale.py: a SLURM job asks for what it needs.
from deephemnma import plan as _plan  # noqa: E402

RUN = _plan.run_from_config(
    config, N_PARTICLES, int(config["simulate"]["box"]) if SIMULATING else _plan.star_box(particles_star())
)


def resources_of(rule, threads=1, **extra):
    """``resources:`` of ``rule``: mem_mb and runtime from deephemnma.plan.job_resources (memory
    and runtime grow with the attempt: a job killed for either asks for more when retried)."""

    def mem_mb(wildcards, attempt):
        return _plan.job_resources(rule, RUN, threads=threads, attempt=attempt)["mem_mb"]

    def runtime(wildcards, attempt):
        return _plan.job_resources(rule, RUN, threads=threads, attempt=attempt)["runtime"]

    return {"mem_mb": mem_mb, "runtime": runtime, **extra}


def reference_file():
    return config["reference"]["path"] or f"{OUT}/reference/ak_open_4ake.pdb"


def evaluating():
    mode = config["workflow"]["evaluate"]
    return mode == "always" or (mode == "auto" and ground_truth() is not None)


# ------------------------------------------------------------------ per-stage configuration
def stage_config_text(stage):
    return yaml.safe_dump(STAGES[stage].select_config(config), sort_keys=True)


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
        stage="|".join(STAGES),
    localrule: True
    run:
        from deephemnma.core.fileio import atomic_write_text

        atomic_write_text(output[0], params.text)


def final_outputs():
    out = [
        f"{R['landscape']}/landscape.star",
        f"{R['groups']}/groups.json",
        f"{R['animate']}/chimerax.cxc",
        f"{R['nma']}/animate",
        f"{OUT}/report.html",
    ]
    if evaluating():
        out += [f"{R['evaluate']}/hemnma/summary.json", f"{R['evaluate']}/predicted/summary.json"]
    # Per-chunk results are products too: a deleted (or failed) chunk is redone, and what
    # depends on it after it (newer input), without touching the other chunks.
    out += [f"{R['align']}/{c}.star" for c in SET1] + [f"{R['predict']}/{c}.star" for c in SET2]
    return out
