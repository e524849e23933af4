#!/usr/bin/env bash
# Issue 27 on a GPU machine, end to end: the README's plan -> launch flow for a local model
# folder (the plan made in one folder, launched from another), and --report-to.
#
#   bash benchmarks/first_contact_gpu.sh [WORK]        # from the repository root
#
# Needs zeroplan importable (PYTHONPATH=repo root) with the [train] stack, one NVIDIA GPU and
# no network: the model is a random tiny Llama with a tokenizer built in code
# (tests/tinyllm.py). Prints one PASS / FAIL / SKIP line per check; exit status 1 when any
# check failed. WORK (default /tmp/first-contact) is wiped first.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=${1:-/tmp/first-contact}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
failed=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; failed=1; }
skip() { echo "SKIP $*"; }
zp() { "$PY" -m zeroplan "$@"; }

rm -rf "$WORK" && mkdir -p "$WORK/elsewhere" || exit 1
cd "$WORK" || exit 1
"$PY" - <<'PY' || { fail "could not build the tiny model"; exit 1; }
import sys
from pathlib import Path
sys.path.insert(0, __import__("os").environ["PYTHONPATH"].split(":")[0] + "/tests")
import tinyllm
tinyllm.build_model_dir(Path("models/my-model"))
tinyllm.write_jsonl(Path("train.jsonl"), tinyllm.alpaca_records(64))
PY
zp env | head -3

# -- 1. plan a local model folder, launch the plan from another folder ---------------------
if zp plan ./models/my-model --data train.jsonl --seq-len 256 -o runs/plan >plan.out 2>&1; then
  pass "zeroplan plan ./models/my-model --data train.jsonl -o runs/plan"
else
  fail "zeroplan plan: $(tail -1 plan.out)"
fi
"$PY" - "$WORK" <<'PY' && pass "plan.json: model 'my-model', model_path the folder (absolute)" || fail "plan.json does not say where the model is"
import json, sys
plan = json.load(open(f"{sys.argv[1]}/runs/plan/plan.json"))
print("  plan.json:", plan["model"], plan.get("model_path"))
sys.exit(not (plan["model"] == "my-model" and plan.get("model_path") == f"{sys.argv[1]}/models/my-model"))
PY
cd "$WORK/elsewhere" || exit 1
zp launch ../runs/plan --data ../train.jsonl -o dry --dry-run >dry.out 2>&1
rc=$?
grep -E "^this host|estimate:|refuses" dry.out | sed 's/^/  /'
if [ $rc -eq 0 ] && grep -q "estimate: .* per GPU: fits" dry.out && ! grep -q "no NVIDIA GPU" dry.out; then
  pass "launch --dry-run from another folder: preflight's memory check on this GPU fits"
else
  fail "launch --dry-run (exit $rc): $(tail -1 dry.out)"
fi

# -- 2. the real launch, with --report-to tensorboard when it is installed ------------------
have_tb=$("$PY" -c "import importlib.util as u; print(int(any(u.find_spec(m) for m in ('tensorboard', 'tensorboardX'))))")
if [ "$have_tb" = 1 ]; then
  report=(--report-to tensorboard)
else
  report=()
  zp launch ../runs/plan --data ../train.jsonl -o r-tb --report-to tensorboard >tb.out 2>&1
  rc=$?
  if [ $rc -eq 2 ] && [ "$(wc -l <tb.out)" -eq 1 ] && grep -q "pip install tensorboard" tb.out && [ ! -e r-tb ]; then
    pass "--report-to tensorboard without tensorboard: one line, exit 2, nothing started"
  else
    fail "--report-to tensorboard without tensorboard (exit $rc): $(cat tb.out | tail -2)"
  fi
  skip "TensorBoard events: neither tensorboard nor tensorboardX is installed here"
fi
zp launch ../runs/plan --data ../train.jsonl -o r1 --max-steps 10 --logging-steps 1 \
  --no-dashboard "${report[@]}" >launch.out 2>&1
rc=$?
tail -2 launch.out | sed 's/^/  /'
if [ $rc -eq 0 ]; then
  pass "zeroplan launch ../runs/plan from another folder trained 10 steps"
else
  fail "zeroplan launch (exit $rc): $(grep -m1 'error' launch.out || tail -1 launch.out)"
fi
"$PY" - "$WORK" <<'PY' && pass "the ranks loaded models/my-model (final/zeroplan.json base_model)" || fail "final/zeroplan.json does not name the model folder"
import json, sys
info = json.load(open(f"{sys.argv[1]}/elsewhere/r1/final/zeroplan.json"))
print("  base_model:", info["base_model"])
sys.exit(info["base_model"] != f"{sys.argv[1]}/models/my-model")
PY
if [ "$have_tb" = 1 ]; then
  "$PY" - "$WORK/elsewhere/r1" <<'PY' && pass "--report-to tensorboard: event files in RUN/tb with train/loss" || fail "--report-to tensorboard: no train/loss events in RUN/tb"
import sys
from pathlib import Path
events = sorted(Path(sys.argv[1], "tb").rglob("events.out.tfevents.*"))
print("  events:", [str(e) for e in events])
if not events:
    sys.exit(1)
try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:  # tensorboardX only: the files are there, not read back
    sys.exit(0)
acc = EventAccumulator(str(events[0].parent))
acc.Reload()
steps = [e.step for e in acc.Scalars("train/loss")]
print("  train/loss steps:", steps)
sys.exit(steps[-1:] != [10])
PY
fi
if zp generate r1 -p "Say hello." --max-new-tokens 5 >gen.out 2>&1; then
  pass "zeroplan generate r1 (the base model found from the run folder)"
else
  fail "zeroplan generate r1: $(tail -1 gen.out)"
fi

# -- 3. a tracker that cannot run is refused before anything starts -------------------------
if "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('wandb') is not None)"; then
  zp launch ../runs/plan --data ../train.jsonl -o r-wandb --report-to wandb >wandb.out 2>&1
  rc=$?
  if [ $rc -eq 2 ] && [ "$(wc -l <wandb.out)" -eq 1 ] && grep -q "pip install wandb" wandb.out && [ ! -e r-wandb ]; then
    pass "--report-to wandb without wandb: one line, exit 2, nothing started"
  else
    fail "--report-to wandb without wandb (exit $rc): $(tail -2 wandb.out)"
  fi
else
  env -u WANDB_API_KEY WANDB_MODE= HOME="$WORK/nohome" zp launch ../runs/plan --data ../train.jsonl \
    -o r-wandb --report-to wandb >wandb.out 2>&1
  rc=$?
  if [ $rc -eq 2 ] && grep -q "not logged in to Weights & Biases" wandb.out && [ ! -e r-wandb ]; then
    pass "--report-to wandb without a login: one line, exit 2, nothing started"
  else
    fail "--report-to wandb without a login (exit $rc): $(tail -2 wandb.out)"
  fi
fi
zp launch ../runs/plan --data ../train.jsonl --report-to comet >comet.out 2>&1
[ $? -eq 2 ] && grep -q "'comet' is not one of" comet.out \
  && pass "--report-to comet: click's choice error, exit 2" || fail "--report-to comet: $(tail -1 comet.out)"

[ $failed -eq 0 ] && echo "ALL PASSED" || echo "SOME FAILED"
exit $failed
