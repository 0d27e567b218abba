# The reference (atomic model or EM map) and its normal modes.


rule fetch_demo_reference:
    """The demo's adenylate kinase (4AKE open, 1AKE closed) from PyPI, checksum-verified."""
    output:
        open=f"{OUT}/reference/ak_open_4ake.pdb",
        closed=f"{OUT}/reference/ak_closed_1ake.pdb",
    log:
        log_of("fetch_demo_reference"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} fetch-demo --outdir {OUT}/reference --log {log}"


rule nma:
    """Elastic-network normal modes of the reference (one .npz) and one animation per mode."""
    input:
        reference=reference_file(),
        cfg=stage_config("nma"),
    output:
        modes=f"{R['nma']}/modes.npz",
        summary=report(f"{R['nma']}/modes.json", caption="../report/nma.rst", category="1. Normal modes"),
        animate=directory(f"{R['nma']}/animate"),
    log:
        log_of("nma"),
    benchmark:
        bench_of("nma")
    threads: 2
    resources:
        **resources_of("nma", threads=2),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} nma --reference {input.reference} --out {output.modes} --summary {output.summary} "
        "--animate {output.animate} --config {input.cfg} --threads {threads} --log {log}"
