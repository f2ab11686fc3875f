"""Are the compiled engine's verify rows bitwise those of its single steps? Layer by layer, for k = 2 and 4.

    python benchmarks/compiled_rows.py [--json benchmarks/compiled_rows_cpu.json]

The default int4 GGUF engine; after a prompt, the same first token is run alone (the compiled k = 1 graph,
what plain decoding runs) and as row 0 of a causal k-token step (the compiled k-token graph, what a drafting
verify runs). Both graphs are compiled as the engine compiled its step before commit 2ecf951, a static graph
per k; the engine now traces one graph with k symbolic, whose verify rows equal its plain steps bitwise
(tests/test_engine.py, and benchmarks/speculative_engine.py's identity check). Prints, per hidden state
(embedding output, then each layer), whether row 0 is bitwise equal and the largest difference; the same
for the logits. The eager engine's rows are equal by construction (tests/test_engine.py).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from celeris.engine import load_engine
    from celeris.engine.engine import _compiled
    from celeris.io import save_results
    from celeris.report import environment

    eng = load_engine(None, quantize="int4", compile=False, progress=False)
    ids = eng.tokenizer("The history of the city of Rome begins", return_tensors="pt").input_ids
    _, logits = eng.prefill(ids)
    n, span = eng.filled, 128
    decoder, head = eng.model.get_decoder(), eng.model.get_output_embeddings()

    def forward(tok, pos, slots, mask):
        out = decoder(input_ids=tok, attention_mask=mask, position_ids=pos, cache_position=slots,
                      past_key_values=eng.cache, use_cache=True, output_hidden_states=True)
        return out.hidden_states, head(out.last_hidden_state).float()

    step = _compiled(forward)
    eng.cache.set_span(span)

    @torch.inference_mode()
    def call(tok):
        k = tok.shape[1]
        mask = torch.zeros(k, span, dtype=torch.bool)
        mask[:, :n] = True
        mask[:, n : n + k] = torch.ones(k, k, dtype=torch.bool).tril()
        pos = torch.arange(n, n + k)[None]
        hs, lg = step(tok, pos, pos[0], mask[None, None])
        return [h[0, 0].float().clone() for h in hs], lg[0, 0].clone()

    tokens = torch.tensor([[int(logits.argmax()), 1234, 567, 89]])
    one_h, one_l = call(tokens[:, :1])
    res = {"environment": environment(), "prompt_tokens": n, "span": span, "rows": {}}
    for k in (int(x) for x in args.ks.split(",")):
        hs, lg = call(tokens[:, :k])
        per = [{"state": i, "equal": bool(torch.equal(a, b)), "max_abs_diff": float((a - b).abs().max())}
               for i, (a, b) in enumerate(zip(one_h, hs, strict=True))]
        res["rows"][f"k={k}"] = {"hidden_states": per, "logits_equal": bool(torch.equal(one_l, lg)),
                                 "logits_max_abs_diff": float((one_l - lg).abs().max()),
                                 "same_argmax": int(one_l.argmax()) == int(lg.argmax())}
        first = next((p["state"] for p in per if not p["equal"]), None)
        print(f"k={k}: first differing hidden state {first} (0 = embeddings), logits equal "
              f"{res['rows'][f'k={k}']['logits_equal']}, max |diff| {res['rows'][f'k={k}']['logits_max_abs_diff']:.3f}")
    if args.json:
        save_results(args.json, res)


if __name__ == "__main__":
    main()
