# HEMNMA elastic + rigid-body alignment of image set 1: one CPU job per chunk, then merge and
# the Mahalanobis outlier filter.


rule align:
    """HEMNMA on one chunk of image set 1 (restartable; resumes from its progress file)."""
    input:
        star=f"{R['preprocess']}/set1/{{chunk}}.star",
        modes=f"{R['nma']}/modes.npz",
        cfg=stage_config("align"),
    output:
        f"{R['align']}/{{chunk}}.star",
    wildcard_constraints:
        chunk=r"chunk_\d+",
    log:
        log_of("align/{chunk}"),
    benchmark:
        bench_of("align/{chunk}")
    threads: 1
    resources:
        **resources_of("align"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} align --particles {input.star} --modes {input.modes} --out {output} --config {input.cfg} "
        "--threads {threads} --log {log}"


rule merge_align:
    """All chunks of image set 1 in plan order."""
    input:
        expand(f"{R['align']}/{{chunk}}.star", chunk=SET1),
    output:
        f"{R['align']}/hemnma.star",
    log:
        log_of("merge_align"),
    benchmark:
        bench_of("merge_align")
    resources:
        **resources_of("merge_align"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} merge --particles {input} --out {output} --log {log}"


rule filter:
    """Mahalanobis outlier filter on the HEMNMA amplitudes (the training set)."""
    input:
        star=f"{R['align']}/hemnma.star",
        cfg=stage_config("filter"),
    output:
        kept=f"{R['filter']}/kept.star",
        dropped=f"{R['filter']}/dropped.star",
        summary=f"{R['filter']}/summary.json",
    log:
        log_of("filter"),
    benchmark:
        bench_of("filter")
    resources:
        **resources_of("filter"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} filter --particles {input.star} --out {output.kept} --dropped {output.dropped} "
        "--summary {output.summary} --config {input.cfg} --log {log}"
