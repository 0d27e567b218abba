# The DeepHEMNMA network: trained on the filtered HEMNMA results (Horovod/DDP ranks), then
# applied to image set 2 shard by shard (one job per preprocessed chunk of set 2).

TRAIN_RANKS = int(config["workflow"]["train_ranks"]) if config["workflow"]["train_engine"] != "single" else 1
TRAIN_NODES = int(config["workflow"]["train_nodes"])
GPUS = int(config["workflow"]["gpus_per_node"])
# SLURM geometry of the training job (snakemake-executor-plugin-slurm): several ranks make it
# an "mpi" job, so the job step is not wrapped in `srun -n1` and the rule's own srun starts the
# ranks; GPUs with tasks_per_gpu=0 so that no --ntasks-per-gpu is imposed (plugin #342/#459).
TRAIN_RESOURCES = {"nodes": TRAIN_NODES}
if TRAIN_RANKS > 1:
    TRAIN_RESOURCES.update(mpi="srun", tasks=TRAIN_RANKS)
if GPUS:
    TRAIN_RESOURCES.update(gpu=GPUS, tasks_per_gpu=0)
PREDICT_RESOURCES = {"gpu": 1, "tasks_per_gpu": 0} if GPUS else {}


def train_launch(wildcards, threads):
    """The command that starts the training ranks (see workflow.train_launcher)."""
    engine = config["workflow"]["train_engine"]
    launcher = config["workflow"]["train_launcher"]
    n = TRAIN_RANKS
    if engine == "single" or launcher == "none" or n == 1:
        return DH
    if launcher == "auto":
        launcher = "srun" if os.environ.get("SLURM_JOB_ID") else ("horovodrun" if engine == "horovod" else "torchrun")
    if launcher == "srun":  # the job holds the tasks (resources tasks/nodes/mpi below)
        return f"srun --ntasks={n} --cpus-per-task={threads} {DH}"
    if launcher == "horovodrun":
        return f"{Path(PY).parent}/horovodrun -np {n} -H localhost:{n} --gloo {DH}"
    return f"{PY} -m torch.distributed.run --standalone --nproc-per-node {n} -m deephemnma"


rule train:
    """ResNet34 + MLP regressor of amplitudes, orientation and shifts. A job killed midway
    continues from network/last.pt; one rerun because its inputs or settings changed starts over."""
    input:
        star=f"{R['filter']}/kept.star",
        manifest=f"{R['preprocess']}/preprocess.json",
        modes=f"{R['nma']}/modes.npz",
        cfg=stage_config("train"),
    output:
        best=f"{R['train']}/best.pt",
        summary=f"{R['train']}/summary.json",
        curves=report(f"{R['train']}/curves.png", caption="../report/training.rst", category="3. Network"),
    log:
        log_of("train"),
    benchmark:
        bench_of("train")
    threads: 1  # per rank (SLURM: --cpus-per-task of each of the job's tasks)
    resources:
        **resources_of("train", threads=TRAIN_RANKS, **TRAIN_RESOURCES),
    params:
        launch=train_launch,
    conda:
        "../../envs/horovod.yaml"
    shell:
        # the log file goes by environment variable: launchers (horovodrun, torchrun) take
        # `--log…` options after the command for their own
        "DEEPHEMNMA_LOG={log} {params.launch} train --particles {input.star} --modes {input.modes} --outdir {R[train]} "
        "--config {input.cfg} --threads {threads} --resume auto"


rule predict:
    """Network predictions for one shard of image set 2, refined by HEMNMA (network.refine)."""
    input:
        star=f"{R['preprocess']}/set2/{{chunk}}.star",
        ckpt=f"{R['train']}/best.pt",
        modes=f"{R['nma']}/modes.npz",
        scores=f"{R['filter']}/kept.star",
        cfg=stage_config("predict"),
    output:
        star=f"{R['predict']}/{{chunk}}.star",
        summary=f"{R['predict']}/{{chunk}}.json",
    wildcard_constraints:
        chunk=r"chunk_\d+",
    log:
        log_of("predict/{chunk}"),
    benchmark:
        bench_of("predict/{chunk}")
    threads: 1  # on CPU one thread per shard (same bytes on any machine); shards run in parallel
    resources:
        **resources_of("predict", **PREDICT_RESOURCES),
    conda:
        "../../envs/torch-gpu.yaml"
    shell:
        "{DH} predict --checkpoint {input.ckpt} --modes {input.modes} --reference-scores {input.scores} "
        "--particles {input.star} --out {output.star} --config {input.cfg} --threads {threads} --log {log}"


rule merge_predict:
    """All shards of image set 2 in plan order."""
    input:
        expand(f"{R['predict']}/{{chunk}}.star", chunk=SET2),
    output:
        star=f"{R['predict']}/predicted.star",
        summary=f"{R['predict']}/summary.json",
    log:
        log_of("merge_predict"),
    benchmark:
        bench_of("merge_predict")
    resources:
        **resources_of("merge_predict"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} merge --particles {input} --out {output.star} --summary {output.summary} --log {log}"
