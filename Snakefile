# deephemnma — DeepHEMNMA conformational landscapes as a Snakemake workflow.
# The stages are in workflow/rules/*.smk; every rule runs one `deephemnma <command>` with
# explicit paths. Run: `make run` (demo), or
#   snakemake --profile config/profiles/local --configfile my.yaml
#   snakemake --profile config/profiles/slurm --configfile my.yaml
from snakemake.utils import min_version

min_version("9.19")


# A run is defined by the user's --configfile / --config and the schema's defaults alone; the
# embedded demo (config/config.yaml) applies only when no configuration is given at all.
if not config:

    configfile: f"{workflow.basedir}/config/config.yaml"


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
