#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, in one script: CUDA tests first, then the benches.
#
#   bash benchmarks/gpu_suite.sh OUT [STAGE ...]
#
# STAGE: tests, whisper (15-s window + naive), trimmed, wavlm, others (roberta-large,
# wavlm-base-plus-sv), decode (decoding workers), finetune, heads (pooled heads, 116k rows),
# compare (heads fp32 vs bf16 with matmul peaks), sweep (1 seed vs 10 seeds trained together),
# frames (MMWhisper frame heads, FRAME_ROWS rows), or all (the default). Each bench
# writes OUT/<name>.json and its console table to OUT/<name>.log; the random-weight models and
# the synthetic corpus are built once under OUT/work (or $WORKDIR) and reused by later stages
# and later calls. A failing stage does not stop the others. Run from the repository root with
# the project installed (`pip install -e .`).
#
# Sizes: UTTERANCES (default 20000) synthetic clips per extraction bench, FT_STEPS (default 30)
# fine-tuning steps, FRAME_ROWS (default 20000; 116000 is MSP-Podcast Train + Development, about
# 82 GB of packed frames on the host) rows of the frame-heads bench, PYTHON (default python3) the interpreter. On one H100 every stage is meant to
# take a few minutes at most.
set -euo pipefail

out=${1:?usage: gpu_suite.sh OUT [tests|whisper|trimmed|wavlm|others|decode|finetune|heads|compare|sweep|frames|all ...]}
shift
stages=("${@:-all}")
utts=${UTTERANCES:-20000}
steps=${FT_STEPS:-30}
frame_rows=${FRAME_ROWS:-20000}
py=${PYTHON:-python3}
work=${WORKDIR:-$out/work}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1

want() {
    local s
    for s in "${stages[@]}"; do [[ $s == all || $s == "$1" ]] && return 0; done
    return 1
}

bench() {  # bench NAME ARGS...: one `ser-cache bench extract`, its table and its JSON kept
    local name=$1
    shift
    echo "== $name: ser-cache bench extract $*"
    "$py" -m ser_cache bench extract --random-init --utterances "$utts" --workdir "$work" \
        --json "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log" || echo "== $name FAILED (the other stages go on)"
}

"$py" - <<'EOF' | tee "$out/machine.txt"
import os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cores", os.cpu_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}")
EOF

if want tests; then
    echo "== tests/e2e/test_cuda.py"
    "$py" -m pytest -q tests/e2e/test_cuda.py 2>&1 | tee "$out/tests.log" || echo "== tests/e2e/test_cuda.py FAILED (benches go on)"
fi
if want whisper; then
    bench whisper-window --model whisper-large-v3 --naive --naive-utterances 32
fi
if want trimmed; then
    bench whisper-trimmed --model whisper-large-v3 --window trimmed
fi
if want wavlm; then
    bench wavlm-large --model wavlm-large --naive --naive-utterances 32
fi
if want others; then
    bench roberta-large --model roberta-large
    bench wavlm-base-plus-sv --model wavlm-base-plus-sv --naive --naive-utterances 32
fi
if want decode; then
    echo "== benchmarks/decode_bench.py: the CPU side, decoding workers handing audio over"
    "$py" benchmarks/decode_bench.py --workers 0 1 4 8 15 --utterances "$utts" --workdir "$work" 2>&1 \
        | tee "$out/decode.jsonl" || echo "== decode FAILED"
fi
if want finetune; then
    echo "== benchmarks/finetune_bench.py --steps $steps"
    "$py" benchmarks/finetune_bench.py --steps "$steps" --json "$out/finetune.json" 2>&1 | tee "$out/finetune.log" \
        || echo "== finetune FAILED"
fi
if want finetune_modes; then
    echo "== benchmarks/finetune_bench.py: full / LoRA / frozen for WavLM Large and Whisper large-v3"
    for enc in wavlm whisper; do
        for mode in full lora frozen; do
            "$py" benchmarks/finetune_bench.py --encoder "$enc" --mode "$mode" --steps "$steps" \
                --json "$out/finetune-$enc-$mode.json" 2>&1 | tee "$out/finetune-$enc-$mode.log" \
                || echo "== finetune $enc $mode FAILED"
        done
    done
fi
if want heads; then
    echo "== benchmarks/train_heads_bench.py --device cuda"
    "$py" benchmarks/train_heads_bench.py --device cuda --keep "$work/heads" --json "$out/heads.json" 2>&1 \
        | tee "$out/heads.log" || echo "== heads FAILED"
fi
if want compare; then
    echo "== benchmarks/train_heads_bench.py --compare --device cuda (fp32 vs bf16, matmul peaks, utilisation)"
    "$py" benchmarks/train_heads_bench.py --compare --device cuda --keep "$work/heads" --json "$out/compare.json" 2>&1 \
        | tee "$out/compare.log" || echo "== compare FAILED"
fi
if want sweep; then
    echo "== benchmarks/sweep_bench.py --device cuda (1 seed vs 10 seeds trained together)"
    "$py" benchmarks/sweep_bench.py --device cuda --keep "$work/heads" --json "$out/sweep.json" 2>&1 \
        | tee "$out/sweep.log" || echo "== sweep FAILED"
fi
if want frames; then
    echo "== benchmarks/train_heads_bench.py --frames --rows $frame_rows --device cuda"
    "$py" benchmarks/train_heads_bench.py --frames --rows "$frame_rows" --device cuda --keep "$work/frames-$frame_rows" \
        --json "$out/frames.json" 2>&1 | tee "$out/frames.log" || echo "== frames FAILED"
fi
