# Landscape, groups (a checkpoint: their number is known only after grouping), one
# reconstruction per group from the original-size images, animations, evaluation.


rule landscape:
    """PCA (or spectral) landscape of the predicted amplitudes (+ HEMNMA's, landscape.fit_on)."""
    input:
        predicted=f"{R['predict']}/predicted.star",
        hemnma=f"{R['filter']}/kept.star",
        cfg=stage_config("landscape"),
    output:
        star=f"{R['landscape']}/landscape.star",
        model=f"{R['landscape']}/model.json",
        plots=report(directory(f"{R['landscape']}/plots"), patterns=["{name}.png"],
                     caption="../report/landscape.rst", category="4. Landscape"),
    log:
        log_of("landscape"),
    benchmark:
        bench_of("landscape")
    threads: 2
    resources:
        **resources_of("landscape", threads=2),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} landscape --particles {input.predicted} --hemnma {input.hemnma} --out {output.star} "
        "--model {output.model} --plots {output.plots} --config {input.cfg} --threads {threads} --log {log}"


checkpoint groups:
    """Groups of particles in the landscape, each a RELION STAR file (groups/group_NN.star), and
    every particle with its group (groups/particles.star: what the results page explores and
    `deephemnma select --groups` reads)."""
    input:
        star=f"{R['landscape']}/landscape.star",
        cfg=stage_config("groups"),
    output:
        json=f"{R['groups']}/groups.json",
        csv=f"{R['groups']}/groups.csv",
        dropped=f"{R['groups']}/dropped.star",
        particles=f"{R['groups']}/particles.star",
        plot=report(f"{R['groups']}/landscape_groups.png", caption="../report/groups.rst", category="4. Landscape"),
    log:
        log_of("groups"),
    benchmark:
        bench_of("groups")
    resources:
        **resources_of("groups"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} groups --particles {input.star} --outdir {R[groups]} --config {input.cfg} --log {log}"


def group_ids(wildcards=None):
    """Group numbers ("01", "02", ...) once the groups checkpoint has run, in sorted order."""
    import json

    doc = json.loads(Path(checkpoints.groups.get().output.json).read_text())
    return sorted(f"{int(g):02d}" for g in doc["groups"])


def group_maps(wildcards=None):
    return [f"{R['reconstruct']}/group_{g}/map.mrc" for g in group_ids()]


rule reconstruct:
    """One group's map, half maps and FSC from the ORIGINAL-size images (before downscaling)."""
    input:
        groups=f"{R['groups']}/groups.json",
        manifest=f"{R['preprocess']}/preprocess.json",
        modes=f"{R['nma']}/modes.npz",
        cfg=stage_config("reconstruct"),
    output:
        map=f"{R['reconstruct']}/group_{{g}}/map.mrc",
        half1=f"{R['reconstruct']}/group_{{g}}/half1.mrc",
        half2=f"{R['reconstruct']}/group_{{g}}/half2.mrc",
        summary=f"{R['reconstruct']}/group_{{g}}/summary.json",
        fsc=report(f"{R['reconstruct']}/group_{{g}}/fsc.png", caption="../report/fsc.rst", category="5. Maps",
                   subcategory="group {g}"),
    wildcard_constraints:
        g=r"\d+",
    log:
        log_of("reconstruct/group_{g}"),
    benchmark:
        bench_of("reconstruct/group_{g}")
    threads: 1  # CPU maps are computed on one thread (same bytes on any machine); groups run in parallel
    resources:
        **resources_of("reconstruct"),
    conda:
        "../../envs/torch-gpu.yaml"
    shell:
        "{DH} reconstruct --particles {R[groups]}/group_{wildcards.g}.star --original --manifest {input.manifest} "
        "--reference {input.modes} "
        "--outdir {R[reconstruct]}/group_{wildcards.g} --config {input.cfg} --threads {threads} --log {log}"


rule animate:
    """The reference along each landscape axis, and each group's centroid structure (ChimeraX)."""
    input:
        model=f"{R['landscape']}/model.json",
        modes=f"{R['nma']}/modes.npz",
        star=f"{R['landscape']}/landscape.star",
        groups=f"{R['groups']}/groups.csv",
        cfg=stage_config("animate"),
    output:
        cxc=f"{R['animate']}/chimerax.cxc",
    log:
        log_of("animate"),
    benchmark:
        bench_of("animate")
    resources:
        **resources_of("animate"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} animate --model {input.model} --modes {input.modes} --particles {input.star} "
        "--groups {input.groups} --outdir {R[animate]} --config {input.cfg} --log {log}"


rule evaluate_hemnma:
    """HEMNMA (image set 1) against the ground truth: the paper's metrics."""
    input:
        star=f"{R['align']}/hemnma.star",
        truth=ground_truth() or [],
        modes=f"{R['nma']}/modes.npz",
        cfg=stage_config("evaluate"),
    output:
        summary=f"{R['evaluate']}/hemnma/summary.json",
    log:
        log_of("evaluate_hemnma"),
    benchmark:
        bench_of("evaluate_hemnma")
    resources:
        **resources_of("evaluate_hemnma"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} evaluate --particles {input.star} --truth {input.truth} --modes {input.modes} "
        "--outdir {R[evaluate]}/hemnma --config {input.cfg} --log {log}"


rule evaluate_predicted:
    """Network predictions (image set 2) against the ground truth, and each group's map
    against the map of its true centroid structure."""
    input:
        star=f"{R['predict']}/predicted.star",
        truth=ground_truth() or [],
        modes=f"{R['nma']}/modes.npz",
        groups=f"{R['groups']}/groups.json",
        landscape=f"{R['landscape']}/landscape.star",
        maps=group_maps,
        cfg=stage_config("evaluate"),
    output:
        summary=f"{R['evaluate']}/predicted/summary.json",
    log:
        log_of("evaluate_predicted"),
    benchmark:
        bench_of("evaluate_predicted")
    resources:
        **resources_of("evaluate_predicted"),
    conda:
        "../../envs/core.yaml"
    shell:
        "{DH} evaluate --particles {input.star} --truth {input.truth} --modes {input.modes} "
        "--groups {R[groups]} --maps {R[reconstruct]} --landscape {input.landscape} --outdir {R[evaluate]}/predicted --config {input.cfg} --log {log}"
