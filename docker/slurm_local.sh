#!/usr/bin/env bash
# A real SLURM job on this one machine: write a minimal slurm.conf, start munged, slurmctld and slurmd,
# submit docker/sbatch_example.sh as a 2-task CPU job (DDP over gloo) on a tiny simulator config, then
# check that the job's validation metrics at its best epoch equal a one-process `recpost validate` of
# the checkpoint it kept. (Two processes train on other batches than one, so the fits themselves
# differ by design; what must not differ is evaluation: no user counted twice or dropped.)
#
#   docker/slurm_local.sh               # as root, from the repository root (about a minute on 2 cores)
#
# Needs: slurm-wlm and munge (Debian: apt-get install slurm-wlm munge) and recpost installed in the
# python on PATH. Nothing under /etc is changed: the daemons and commands read $WORK/slurm.conf
# (SLURM_CONF). Settings: WORK (default /tmp/recpost-slurm), KEEP_DAEMONS=1 leaves the daemons running.
set -euo pipefail

WORK="${WORK:-/tmp/recpost-slurm}"
cd "$(dirname "$0")/.."
rm -rf "$WORK" && mkdir -p "$WORK"/{state,spool,runs}
export SLURM_CONF="$WORK/slurm.conf"
node="$(hostname -s)"
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

# One node (this machine) with all its cores, one partition; no cgroups, accounting or GPUs needed.
cat > "$SLURM_CONF" <<EOF
ClusterName=recpost-local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$memory_mb State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF

started=()
stop_daemons() {
  if [ "${KEEP_DAEMONS:-0}" != 1 ]; then
    for pid in "${started[@]}"; do kill "$pid" 2> /dev/null || true; done
  fi
}
trap stop_daemons EXIT
if ! pgrep -x munged > /dev/null; then
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- munged  # Debian's package made the key (/etc/munge/munge.key)
  started+=("$(cat /run/munge/munged.pid)")
fi
slurmctld -c  # -c: no state from earlier runs
slurmd -c
sleep 1
started+=("$(cat "$WORK/slurmctld.pid")" "$(cat "$WORK/slurmd.pid")")
for _ in $(seq 30); do
  [ "$(sinfo -h -n "$node" -o %T)" = idle ] && break
  sleep 1
done
sinfo

# The tiny study: the simulator with 301 users (uneven over 2 tasks) and 200 items, 2 epochs on CPUs.
tiny=(--data.source.init_args.world.n_users 301 --data.source.init_args.world.n_items 200 --trainer.max_epochs 2)
cpu=(--trainer.accelerator cpu --trainer.precision 32-true)
export CONFIG=configs/pretrain/sim.yaml RECPOST_CACHE_DIR="$WORK/cache" WANDB_MODE=disabled
# The example asks for 2 nodes x 4 GPUs with 8 cores per task; here: 1 node, 2 tasks, 1 core each, no GPU.
echo "== sbatch docker/sbatch_example.sh (1 node x 2 tasks, CPU, gloo)"
sbatch --wait --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 --output="$WORK/job-%j.out" \
  docker/sbatch_example.sh "${cpu[@]}" "${tiny[@]}" --trainer.default_root_dir "$WORK/runs/job"
job_log="$(ls "$WORK"/job-*.out)"
grep -E "recpost fit:|MEMBER|Initializing distributed" "$job_log" || true

run="$WORK/runs/job/lightning_logs/version_0"
echo "== one process: recpost validate of the job's best.ckpt"
python -m recpost validate --config "$CONFIG" "${cpu[@]}" "${tiny[@]}" --trainer.devices 1 --trainer.num_nodes 1 \
  --trainer.strategy auto --ckpt_path "$run/checkpoints/best.ckpt" --trainer.default_root_dir "$WORK/runs/one" \
  > "$WORK/validate.log" 2>&1

python - "$run" "$WORK/runs/one/lightning_logs/version_0/val_metrics.json" <<'EOF'
import csv, json, sys
import torch

run, one_path = sys.argv[1], sys.argv[2]
epoch = torch.load(f"{run}/checkpoints/best.ckpt", map_location="cpu", weights_only=True)["epoch"]
rows = [r for r in csv.DictReader(open(f"{run}/metrics.csv")) if r.get("val/ndcg@10") and int(r["epoch"]) == epoch]
job, one = {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}, json.load(open(one_path))
print(f"{'metric':<28}{'job: 2 tasks':>16}{'one process':>16}")
for name in sorted(one):
    print(f"{name:<28}{job.get(name, float('nan')):>16.6f}{one[name]:>16.6f}{'' if job.get(name) == one[name] else '  DIFFERENT'}")
different = [name for name in one if job.get(name) != one[name]]
print(f"best epoch {epoch}: " + ("metrics equal: the 2-task job and one process" if not different else f"DIFFERENT: {different}"))
sys.exit(1 if different else 0)
EOF
