# The HTML report of the whole results tree (Snakemake's own --report is available too).


rule report:
    """One self-contained HTML page: normal modes, alignment, training, landscape, groups, maps."""
    input:
        [o for o in final_outputs() if not o.endswith("report.html")],
        group_maps,
        cfg=stage_config("report"),
    output:
        report(f"{OUT}/report.html", caption="../report/report.rst", category="0. Summary"),
    log:
        log_of("report"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} report --results {OUT} --out {output} --config {input.cfg} --log {log}"
