# Landscape, groups (a checkpoint: their number is known only after grouping), one
# reconstruction per group from the original-size images, animations, evaluation.


rule landscape:
    """PCA (or spectral) landscape of the predicted amplitudes (+ HEMNMA's, landscape.fit_on)."""
    input:
        predicted=f"{OUT}/predict/predicted.star",
        hemnma=f"{OUT}/filter/kept.star",
        cfg=stage_config("landscape"),
    output:
        star=f"{OUT}/landscape/landscape.star",
        model=f"{OUT}/landscape/model.json",
        plots=report(directory(f"{OUT}/landscape/plots"), patterns=["{name}.png"],
                     caption="../report/landscape.rst", category="4. Landscape"),
    log:
        log_of("landscape"),
    benchmark:
        bench_of("landscape")
    threads: 2
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} landscape --particles {input.predicted} --hemnma {input.hemnma} --out {output.star} "
        "--model {output.model} --plots {output.plots} --config {input.cfg} --threads {threads} --log {log}"


checkpoint groups:
    """Groups of particles in the landscape, each a RELION STAR file (groups/group_NN.star)."""
    input:
        star=f"{OUT}/landscape/landscape.star",
        cfg=stage_config("landscape"),
    output:
        json=f"{OUT}/groups/groups.json",
        csv=f"{OUT}/groups/groups.csv",
        dropped=f"{OUT}/groups/dropped.star",
        plot=report(f"{OUT}/groups/landscape_groups.png", caption="../report/groups.rst", category="4. Landscape"),
    log:
        log_of("groups"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} groups --particles {input.star} --outdir {OUT}/groups --no-all --config {input.cfg} --log {log}"


def group_ids(wildcards=None):
    """Group numbers ("01", "02", ...) once the groups checkpoint has run, in sorted order."""
    import json

    doc = json.loads(Path(checkpoints.groups.get().output.json).read_text())
    return sorted(f"{int(g):02d}" for g in doc["groups"])


def group_maps(wildcards=None):
    return [f"{OUT}/maps/group_{g}/map.mrc" for g in group_ids()]


rule reconstruct:
    """One group's map, half maps and FSC from the ORIGINAL-size images (before downscaling)."""
    input:
        groups=f"{OUT}/groups/groups.json",
        manifest=f"{OUT}/preprocess/preprocess.json",
        cfg=stage_config("reconstruct"),
    output:
        map=f"{OUT}/maps/group_{{g}}/map.mrc",
        half1=f"{OUT}/maps/group_{{g}}/half1.mrc",
        half2=f"{OUT}/maps/group_{{g}}/half2.mrc",
        summary=f"{OUT}/maps/group_{{g}}/summary.json",
        fsc=report(f"{OUT}/maps/group_{{g}}/fsc.png", caption="../report/fsc.rst", category="5. Maps",
                   subcategory="group {g}"),
    wildcard_constraints:
        g=r"\d+",
    log:
        log_of("reconstruct/group_{g}"),
    benchmark:
        bench_of("reconstruct/group_{g}")
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../../envs/torch-gpu.yaml"
    shell:
        "{DH} reconstruct --particles {OUT}/groups/group_{wildcards.g}.star --original --manifest {input.manifest} "
        "--outdir {OUT}/maps/group_{wildcards.g} --config {input.cfg} --threads {threads} --log {log}"


rule animate:
    """The reference along each landscape axis, and each group's centroid structure (ChimeraX)."""
    input:
        model=f"{OUT}/landscape/model.json",
        modes=f"{OUT}/nma/modes.npz",
        star=f"{OUT}/landscape/landscape.star",
        groups=f"{OUT}/groups/groups.csv",
        cfg=stage_config("landscape"),
    output:
        cxc=f"{OUT}/animate/chimerax.cxc",
    log:
        log_of("animate"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} animate --model {input.model} --modes {input.modes} --particles {input.star} "
        "--groups {input.groups} --outdir {OUT}/animate --config {input.cfg} --log {log}"


rule evaluate_hemnma:
    """HEMNMA (image set 1) against the ground truth: the paper's metrics."""
    input:
        star=f"{OUT}/align/hemnma.star",
        truth=ground_truth() or [],
        modes=f"{OUT}/nma/modes.npz",
        cfg=stage_config("landscape"),
    output:
        summary=f"{OUT}/evaluate/hemnma/summary.json",
    log:
        log_of("evaluate_hemnma"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} evaluate --particles {input.star} --truth {input.truth} --modes {input.modes} "
        "--outdir {OUT}/evaluate/hemnma --config {input.cfg} --log {log}"


rule evaluate_predicted:
    """Network predictions (image set 2) against the ground truth, and each group's map
    against the map of its true centroid structure."""
    input:
        star=f"{OUT}/predict/predicted.star",
        truth=ground_truth() or [],
        modes=f"{OUT}/nma/modes.npz",
        groups=f"{OUT}/groups/groups.json",
        maps=group_maps,
        cfg=stage_config("landscape"),
    output:
        summary=f"{OUT}/evaluate/predicted/summary.json",
    log:
        log_of("evaluate_predicted"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} evaluate --particles {input.star} --truth {input.truth} --modes {input.modes} "
        "--groups {OUT}/groups --maps {OUT}/maps --outdir {OUT}/evaluate/predicted --config {input.cfg} --log {log}"
