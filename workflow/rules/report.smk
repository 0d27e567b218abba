# The results page of the whole results tree (Snakemake's own --report is available too).


rule report:
    """The results page: one self-contained HTML file that leads with the answer (landscape,
    groups, maps, motions) and its health, with an interactive explorer of every particle
    (groups/particles.star) and 3D views of the maps and animations."""
    input:
        [o for o in final_outputs() if not o.endswith("report.html")],
        group_maps,
        particles=f"{R['groups']}/particles.star",
        cfg=stage_config("report"),
    output:
        report(f"{OUT}/report.html", caption="../report/report.rst", category="0. Summary"),
    log:
        log_of("report"),
    benchmark:
        bench_of("report")
    resources:
        **resources_of("report"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} report --results {OUT} --out {output} --config {input.cfg} --log {log}"
