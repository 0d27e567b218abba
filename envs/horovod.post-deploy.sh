#!/usr/bin/env bash
# Snakemake runs this once, with the new environment active, after creating envs/horovod.yaml
# (see the comment there): build and install Horovod for this environment's torch.
# Snakemake copies this file next to the environment, so the repository is found from the
# working directory (the workflow's), PYTHONPATH, or DEEPHEMNMA_REPO.
set -euo pipefail
IFS=: read -r -a pp <<< "${PYTHONPATH:-}"
for d in "${DEEPHEMNMA_REPO:-}" "$PWD" "${pp[@]}"; do
    if [ -n "$d" ] && [ -f "$d/scripts/install_horovod.sh" ]; then
        exec bash "$d/scripts/install_horovod.sh" "${CONDA_PREFIX:?no active conda environment}"
    fi
done
echo "horovod.post-deploy.sh: scripts/install_horovod.sh not found (run from the repository or set DEEPHEMNMA_REPO)" >&2
exit 1
