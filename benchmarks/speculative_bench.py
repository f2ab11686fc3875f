"""ReDrafter vs Hugging Face decoders on held-out prompts (a thin script over `celeris bench speculative`).

    python benchmarks/speculative_bench.py --prompts benchmarks/speculative_prompts.jsonl \
        --max-new-tokens 128 --configs 1x6a,1x3,1x4,2x3 --repeats 5 --json speculative.json

hf-generate and celeris-plain always run; choose --configs with benchmarks/speculative_sweep.py (validation
prompts), never on these prompts.
"""

from celeris.speculative.bench import bench_speculative

if __name__ == "__main__":
    bench_speculative()
