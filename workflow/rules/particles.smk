# Particles: the synthetic benchmark (or your STAR file), then preprocessing in chunks.
# The chunk plan (CHUNKS, SET1, SET2) is known when the workflow is parsed.

if SIMULATING:

    rule simulate:
        """The paper's synthetic adenylate-kinase particles with their ground truth."""
        input:
            modes=f"{R['nma']}/modes.npz",
            cfg=stage_config("simulate"),
        output:
            star=f"{R['simulate']}/particles.star",
            truth=f"{R['simulate']}/ground_truth.star",
            manifest=f"{R['simulate']}/simulate.json",
        log:
            log_of("simulate"),
        benchmark:
            bench_of("simulate")
        threads: 2
        resources:
            **resources_of("simulate", threads=2),
        conda:
            "../../envs/core.yaml"
        shell:
            "{DH} simulate --modes {input.modes} --outdir {R[simulate]} --config {input.cfg} "
            "--threads {threads} --log {log}"


rule preprocess_chunk:
    """One chunk: phase flip, downscale, normalise, contrast polarity; STAR + MRC stack."""
    input:
        star=particles_star(),
        modes=f"{R['nma']}/modes.npz",
        cfg=stage_config("preprocess"),
    output:
        star=f"{R['preprocess']}/{{set}}/{{chunk}}.star",
        stack=f"{R['preprocess']}/{{set}}/{{chunk}}.mrcs",
        record=f"{R['preprocess']}/{{set}}/{{chunk}}.json",
    wildcard_constraints:
        set="set1|set2",
        chunk=r"chunk_\d+",
    log:
        log_of("preprocess/{set}_{chunk}"),
    benchmark:
        bench_of("preprocess/{set}_{chunk}")
    threads: 1
    resources:
        **resources_of("preprocess_chunk"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} preprocess --particles {input.star} --outdir {R[preprocess]} --reference {input.modes} "
        "--chunks {wildcards.set}/{wildcards.chunk} --config {input.cfg} --threads {threads} --log {log}"


rule preprocess_index:
    """Per-set STAR files and the manifest, once every chunk is done (nothing is redone)."""
    input:
        star=particles_star(),
        modes=f"{R['nma']}/modes.npz",
        cfg=stage_config("preprocess"),
        chunks=[f"{R['preprocess']}/{c['star']}" for c in CHUNKS],
    output:
        set1=f"{R['preprocess']}/set1.star",
        set2=f"{R['preprocess']}/set2.star",
        manifest=f"{R['preprocess']}/preprocess.json",
    log:
        log_of("preprocess_index"),
    benchmark:
        bench_of("preprocess_index")
    threads: 1
    resources:
        **resources_of("preprocess_index"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} preprocess --particles {input.star} --outdir {R[preprocess]} --reference {input.modes} "
        "--config {input.cfg} "
        "--threads {threads} --log {log}"
