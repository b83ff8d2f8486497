#!/usr/bin/env bash
# The real-Slurm check of `ser-cache slurm extract`, outside pytest, with a readable log:
# start a one-node Slurm (slurm_cluster.sh), run slurm_check.py's steps (one process; an array of 3;
# a cancelled task resubmitted alone; each store compared byte for byte with the one-process one), stop it.
#
#   tests/integration/run_slurm_check.sh [WORK_DIR]        (as root; apt-get install -y slurm-wlm munge)
#
# WORK_DIR (default: a new folder under /tmp) keeps the stores, the sbatch scripts and the task logs;
# the cluster's state and logs are in WORK_DIR/slurm. Exit 0 when every step passed.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${1:-$(mktemp -d /tmp/ser-cache-slurm-check.XXXXXX)}
mkdir -p "$WORK"
chmod 755 "$WORK"  # munged wants every folder above its socket searchable by all
WORK=$(cd "$WORK" && pwd)
STATE=$WORK/slurm

# The tasks import the same code as this shell: the checkout's src first.
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1

echo "# $(date -u '+%F %T') UTC on $(hostname -s): $(slurmctld -V 2>/dev/null || echo 'slurmctld missing'), $(nproc) cores"
echo "# python: $(command -v python) ($(python -c 'import ser_cache; print(ser_cache.__file__)'))"
echo "$ $HERE/slurm_cluster.sh start $STATE"
"$HERE/slurm_cluster.sh" start "$STATE"
trap 'echo "$ $HERE/slurm_cluster.sh stop $STATE"; "$HERE/slurm_cluster.sh" stop "$STATE"' EXIT

python "$HERE/slurm_check.py" "$STATE/slurm.conf" "$WORK"
