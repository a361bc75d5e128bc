# Shared body of the sbatch templates in this folder (sourced by them, not submitted itself):
#
#     source slurm/launch.sh SCRIPT [SCRIPT ARGS...]
#
# runs `accelerate launch SCRIPT ARGS` on every node of the allocation: ONE srun task per node, each starting
# that node's processes. Settings (environment variables, with defaults):
#
#   ACCELERATE_CONFIG   accelerate_configs/ddp.yaml   the backend (DDP, DeepSpeed ZeRO-2/3, FSDP, multi_cpu...)
#   NPROC_PER_NODE      $SLURM_GPUS_ON_NODE, else 1   training processes per node (one per GPU)
#   MASTER_PORT         20000 + job id % 20000        rendezvous port on the first node
#   PREEMPTIBLE         1                             on the time-limit signal (USR1): checkpoint, stop, requeue
#
# Preemption (PREEMPTIBLE=1; the template asks for `#SBATCH --signal=B:USR1@120 --requeue`): ~120 s before
# the time limit Slurm sends USR1 to this batch shell only. The trap below forwards it to every process of
# the job step on every node; the training processes then save a complete checkpoint at the next optimizer
# step and exit with status 0, and this shell requeues the job. The requeued job runs this same script with
# the same arguments, which must include `--resume_from_checkpoint latest`: it continues from the newest
# complete checkpoint (or starts fresh if none was committed yet).
set -uo pipefail

SCRIPT=${1:?usage: source slurm/launch.sh SCRIPT [ARGS...]}
shift
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/ddp.yaml}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
PREEMPTIBLE=${PREEMPTIBLE:-1}
for f in "$SCRIPT" "$ACCELERATE_CONFIG"; do
    [[ -f $f ]] || { echo "launch.sh: $f not found (submit from the dpo_core checkout, or cd there)" >&2; exit 2; }
done
if [[ $PREEMPTIBLE == 1 && " $* " != *" --resume_from_checkpoint "* ]]; then
    echo "launch.sh: WARNING: no --resume_from_checkpoint on the command line; unless the --config file sets" \
         "it to latest, a requeued job refuses its own output_dir (PREEMPTIBLE=0 turns requeueing off)" >&2
fi

# Rendezvous on the first node, by its address (`scontrol show node`'s NodeAddr): its name may not resolve
# the same on every node, and the address avoids a DNS lookup.
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node -o "$FIRST_NODE" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
NUM_PROCESSES=$((SLURM_NNODES * NPROC_PER_NODE))
echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x" \
     "$NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT, $ACCELERATE_CONFIG, $SCRIPT $*"

# What each node runs. \$SLURM_NODEID is escaped: it must expand ON the node (0, 1, ...), not here, where it
# is 0 for everyone (every node would claim rank 0 and the rendezvous would hang; accelerate issue #2816).
# The launcher (torchrun) must survive the stop signals that are meant for the training processes:
#  - USR1: torchrun has no handler and would die (exit 138): ignored (the trainers install their own);
#  - TERM (scancel, preemption): torchrun would kill its workers mid-checkpoint and report a failure: ignored,
#    and PET_SIGNALS_TO_HANDLE=SIGINT keeps it from installing its TERM handler again.
# The trainers inherit the ignore and replace it with their handlers once training starts.
NODE_CMD="trap '' USR1 TERM; export PET_SIGNALS_TO_HANDLE=SIGINT; exec accelerate launch \
    --config_file $ACCELERATE_CONFIG --num_machines $SLURM_NNODES --num_processes $NUM_PROCESSES \
    --machine_rank \$SLURM_NODEID --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \
    --rdzv_backend static \"\$@\""

stop_requested=0
forward_stop() {  # USR1 reaches this shell only (--signal=B:USR1): hand it to every process of the step
    stop_requested=1
    echo "[$(date -Is)] USR1: asking training to checkpoint and stop"
    scancel --signal=USR1 "$SLURM_JOB_ID"
}
if [[ $PREEMPTIBLE == 1 ]]; then trap forward_stop USR1; fi
# TERM (scancel, preemption, requeue) goes to the step's processes from Slurm itself; this shell only waits
# for them to checkpoint within KillWait.
trap 'echo "[$(date -Is)] TERM: waiting for training to stop"' TERM

srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c "$NODE_CMD" node-launcher "$SCRIPT" "$@" &
SRUN_PID=$!
while :; do  # a trapped signal interrupts `wait`: wait again until srun has really ended
    wait "$SRUN_PID"
    rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
echo "[$(date -Is)] the processes of all nodes ended with status $rc"

if [[ $stop_requested == 1 && $rc == 0 ]]; then
    # The checkpoint is committed. Requeue: same job id, same script and arguments. Slurm holds a requeued
    # job back for its credential lifetime (~120 s) unless its start time is reset once it is PENDING; this
    # shell is killed by the requeue, so a small detached helper does that (where the cluster's process
    # tracking ends it with the job, the job just waits the ~120 s).
    setsid -f bash -c "for _ in \$(seq 300); do sleep 1
        [[ \$(squeue -h -j $SLURM_JOB_ID -o %T) == PENDING ]] && exec scontrol update JobId=$SLURM_JOB_ID StartTime=now
        done" </dev/null >/dev/null 2>&1
    echo "[$(date -Is)] requeueing job $SLURM_JOB_ID"
    trap - TERM  # the requeue TERMs this shell: let it end
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60
fi
exit "$rc"
