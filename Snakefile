# deephemnma — DeepHEMNMA conformational landscapes as a Snakemake workflow.
# The stages are in workflow/rules/*.smk; every rule runs one `deephemnma <command>` with
# explicit paths. Run: `make run` (demo), or
#   snakemake --profile config/profiles/local --configfile my.yaml
#   snakemake --profile config/profiles/slurm --configfile my.yaml
from snakemake.utils import min_version

min_version("9.19")


configfile: f"{workflow.basedir}/config/config.yaml"  # the embedded default; --configfile adds to it


include: "workflow/rules/common.smk"
include: "workflow/rules/reference.smk"
include: "workflow/rules/particles.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/network.smk"
include: "workflow/rules/landscape.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_outputs(),
        group_maps,
    default_target: True
