#!/usr/bin/env bash
# The checks issue 15 leaves for a machine with an NVIDIA GPU, as one call of the device tool (about 8-9 minutes on
# an H100 with 16 cores; give it timeout_s=590 and read what came back before calling again):
#
#   1. the GPU, torch and CUDA versions                                          -> $OUT/gpu.txt
#   2. the CUDA tests (PEFT's bits on the GPU, --each on cuda, unmerge)          -> $OUT/tests.txt
#   3. the 1.1B-shape benchmark fixture (benchmarks/make_tinyllama.py)          -> $OUT/fixture.txt
#   4. bench_merge.py --device cuda on both shard layouts, beside cp and PEFT    -> $OUT/bench_cuda.txt
#   5. bench_merge.py --device cpu on the same machine (3 shards), for the table -> $OUT/bench_cpu.txt
#
# Then the README's H100 table ("On a machine with an NVIDIA H100") takes the new numbers, with the date.
# The machine reaches no network and has torch (CUDA), transformers, peft, safetensors, click, rich, pluggy, pytest
# and numpy but not bitsandbytes: the package runs from this checkout (PYTHONPATH), and its 4-bit tests are not run.
# Each step has its own time limit and the next step runs whatever the last one did, so one call always brings
# back what could be measured.
#
# Usage (repository root): bash benchmarks/device_check.sh        (OUT defaults to ./device-out)
set -u
out="${OUT:-device-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, its output and exit status in $out/NAME.txt
    local name="$1" limit="$2"
    shift 2
    echo "== $name: $*" >&2
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    echo "exit $? after ${SECONDS}s of the script" >>"$out/$name.txt"
}

step gpu 60 sh -c 'nvidia-smi; nproc; python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"'
step tests 150 python -m pytest -q tests/test_merge_gpu.py tests/test_merge_each.py -k "cuda"
step fixture 120 python benchmarks/make_tinyllama.py
step bench_cuda 210 python benchmarks/bench_merge.py --device cuda --runs 3 --peft-runs 1
step bench_cpu 120 python benchmarks/bench_merge.py --device cpu --runs 3 --peft-runs 1 --shards keep
tail -n 12 "$out"/*.txt
