"""ReDrafter vs Hugging Face decoders on held-out prompts (a thin script over `celeris bench speculative`).

    OMP_NUM_THREADS=1 python benchmarks/speculative_bench.py --prompts benchmarks/speculative_prompts.jsonl \
        --max-new-tokens 128 --configs 1x5,2x5,4x5 --repeats 3 --json speculative.json
"""

from celeris.speculative.bench import bench_speculative

if __name__ == "__main__":
    bench_speculative()
