#!/usr/bin/env bash
# Every check that needs a GPU, in one go, for the day one is lent: a GPU session is short and
# costly, so nothing here is typed by hand. On one GPU, under 8 minutes in all (each step has a time
# limit, and the steps share an overall deadline). The checks of correctness first, then the figures:
#
#   1. NCCL on this GPU                 a 1-rank NCCL process group: all_reduce, a broadcast of an object,
#                                       and FSDP2 (fully_shard per block, then the root; bf16 compute,
#                                       fp32 reduce, as parallel.py) against the unsharded model
#   2. train.py --preset smoke --bf16   the demo loop end to end on the GPU under bf16 autocast
#   3. torchrun --nproc_per_node 1      the same smoke run launched by torchrun (1 process; with one
#                                       process train.py makes no process group)
#   4. bench/logprob.py --device cuda   sequence log-probs at Mistral-7B's head: time and peak memory
#   5. bench/round.py --device cuda     a self-play round against transformers, a ~1B bf16 model
#   6. bench/generate.py --device cuda  generate against transformers, the same model, peak memory
#   7. bench/memory.py --device cuda    one training step at 7B width (1 and 2 layers), autocast and bf16
#
#     bash bench/gpu.sh                 # figures to bench/results/gpu.md
#     bash bench/gpu.sh OUT.md          # or to OUT.md
#
# Every step's output goes into the one file, with its command, exit status and wall time; a step
# that fails or runs out of time is recorded and the next one runs. The exit status is 1 if any
# step failed. Without a GPU it says so and exits 0, having run nothing.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/bench/results/gpu.md}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
PYTHON="${PYTHON:-python}"
cd "$ROOT"

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu.sh: no GPU here (torch.cuda.is_available() is False), so there is nothing to measure; exiting"
    exit 0
fi

BUDGET=470                      # seconds for all the steps: 7 min 50 s
START=$SECONDS
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$(dirname "$OUT")"
FAILED=()

{
    echo "# GPU checks: \`bash bench/gpu.sh\`"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- $("$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")')"
    echo "- $(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null || echo 'nvidia-smi: not available')"
    echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores; load average $(cut -d' ' -f1 /proc/loadavg)"
} > "$OUT"

# step NAME LIMIT COMMAND...: run COMMAND with at most LIMIT seconds (less if the budget is nearly
# spent), its output into the file, its status and wall time after it
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        printf '\n## %s\n\nskipped: the %d s budget is spent\n' "$name" "$BUDGET" >> "$OUT"
        FAILED+=("$name (skipped)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "bench/gpu.sh: $name (at most $limit s) ..."
    printf '\n## %s\n\n`%s`\n\n```\n' "$name" "$*" >> "$OUT"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$OUT" 2>&1
    local rc=$?
    printf '```\n\nexit status %d, %d s wall%s\n' "$rc" $((SECONDS - t0)) \
        "$([ "$rc" -eq 124 ] && echo ", stopped at its $limit s limit")" >> "$OUT"
    [ "$rc" -ne 0 ] && FAILED+=("$name (exit $rc)")
}

cat > "$SCRATCH/nccl.py" <<'EOF'
"""One NCCL rank on this GPU: collectives, then FSDP2 (as parallel.py applies it) against the plain model."""
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model import ModelArgs, Transformer
from space import sequence_logprobs

device = torch.device("cuda", 0)
torch.cuda.set_device(device)
dist.init_process_group("nccl", device_id=device)
x = torch.arange(4.0, device=device)
dist.all_reduce(x)
obj = [{"rank": dist.get_rank()} if dist.get_rank() == 0 else None]
dist.broadcast_object_list(obj, src=0)
assert x.tolist() == [0.0, 1.0, 2.0, 3.0] and obj[0] == {"rank": 0}, (x, obj)
print(f"NCCL {torch.cuda.nccl.version()}: all_reduce and broadcast_object_list on "
      f"{dist.get_world_size()} rank")

args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=640, vocab_size=1000,
                 max_seq_len=128, sliding_window=None, model_type="llama")
g = torch.Generator().manual_seed(0)
tokens = torch.randint(1000, (4, 65), generator=g).to(device)
mask = torch.rand(4, 64, generator=g).lt(0.7).to(device)


def loss_and_grads(model, autocast):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        hidden = model(tokens[:, :-1], return_hidden=True)
        loss = -sequence_logprobs(hidden, model.output.weight, tokens[:, 1:], mask).sum() / mask.sum()
    loss.backward()
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]
    return loss.item(), torch.cat([t.float().flatten() for t in grads])


plain = Transformer(args).init_weights(0).to(device)
sharded = Transformer(args).init_weights(0).to(device)
policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
for block in sharded.layers:
    fully_shard(block, mp_policy=policy)
fully_shard(sharded, mp_policy=policy)
a, ga = loss_and_grads(plain, autocast=True)
b, gb = loss_and_grads(sharded, autocast=False)
rel = ((ga - gb).norm() / ga.norm()).item()
print(f"FSDP2 on 1 rank, bf16 compute: loss {b:.5f} against {a:.5f} unsharded under autocast; gradients "
      f"differ by {rel:.2e} (relative norm)")
assert abs(a - b) < 2e-2 * abs(a) and rel < 5e-2, "FSDP2 and the plain model disagree beyond bf16 rounding"
dist.destroy_process_group()
EOF
step "NCCL and FSDP2 on this GPU, 1 rank" 45 \
    env PYTHONPATH="$ROOT" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 "$SCRATCH/nccl.py"
step "the smoke run in bf16 (train.py)" 90 "$PYTHON" train.py --preset smoke --bf16 --out "$SCRATCH/smoke_bf16"
step "the smoke run under torchrun, 1 process" 90 \
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 train.py --preset smoke --bf16 \
    --out "$SCRATCH/smoke_torchrun"
step "sequence log-probs (bench/logprob.py)" 60 "$PYTHON" bench/logprob.py --device cuda
step "a self-play round against transformers (bench/round.py)" 70 "$PYTHON" bench/round.py --device cuda --runs 3
step "generation against transformers (bench/generate.py)" 100 "$PYTHON" bench/generate.py --device cuda --runs 3
step "one training step at 7B width (bench/memory.py)" 120 \
    "$PYTHON" bench/memory.py --device cuda --only step --precision autocast --precision bf16

{
    echo
    echo "total $((SECONDS - START)) s wall; failed: ${FAILED[*]:-none}"
} >> "$OUT"
echo "bench/gpu.sh: $((SECONDS - START)) s; figures in $OUT; failed: ${FAILED[*]:-none}"
[ "${#FAILED[@]}" -eq 0 ]
