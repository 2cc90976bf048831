"""Hard negatives for every caption of a JSONL file: the five DeGLA rewrite types, from an LLM or rules.

    python launch/make_negatives.py --in captions.jsonl --out negatives.jsonl --backend rule --num-negatives 4
    OPENAI_API_KEY=... python launch/make_negatives.py --in captions.jsonl --out negatives.jsonl \
        --backend llm --url http://localhost:8000/v1 --model Qwen2.5-7B-Instruct --concurrency 32

Input lines hold `caption` (and `id`; else the line number). The output is the side file that
`make_shards.py --negatives` reads: one {id, negatives, types} per line. Answers failing validation go to
OUT.rejects.jsonl; captions that got fewer than --num-negatives go to OUT.short.jsonl, each with why
(the types that did not apply, the answers rejected), and a line on stderr counts them (--strict: exit 1).
LLM answers are cached in OUT.cache.jsonl, so a rerun asks only what is missing.
The key is read from the environment variable --api-key-env and never printed.
"""
import argparse
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ADVICE = {"rule": "the rule backend knows only the words of its lexicon; use --backend llm, lower --num-negatives, "
                  "or let make_shards.py drop them",
          "llm": "the types did not apply or the answers failed validation (see {rejects}); try another --model, "
                 "lower --num-negatives, or let make_shards.py drop them"}


def shortfall_reason(not_applicable: list[str], rejected: list[dict]) -> str:
    """Why a caption got fewer negatives than asked: the types that did not apply, the answers rejected."""
    parts = []
    if not_applicable:
        parts.append("not applicable: " + ", ".join(not_applicable))
    if rejected:
        parts.append("rejected: " + ", ".join(f"{r['type']} {r['answer']!r} ({r['reason']})" for r in rejected))
    return "; ".join(parts) or "every answer was accepted, but --types allow fewer rewrites than --num-negatives"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inp", required=True, help="JSONL with a caption (and id) per line")
    parser.add_argument("--out", required=True, help="side file to write: {id, negatives, types} per line")
    parser.add_argument("--backend", choices=["rule", "llm"], default="rule")
    parser.add_argument("--num-negatives", type=int, default=4)
    parser.add_argument("--types", default="reshuffle,swap_noun,swap_adj,replace_adj,replace_noun")
    parser.add_argument("--url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    parser.add_argument("--model", help="model name the endpoint serves")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--max-retries", type=int, default=5, help="per request, with exponential back-off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a caption got fewer than --num-negatives")
    args = parser.parse_args(argv)

    from degla_scale.data import negatives as N

    types = tuple(t for t in args.types.split(",") if t)
    if unknown := [t for t in types if t not in N.TYPES]:
        parser.error(f"--types {','.join(unknown)}: choose from {','.join(N.TYPES)}")
    if not Path(args.inp).is_file():
        parser.error(f"--in {args.inp}: no such file")
    out = Path(args.out)
    if args.backend == "llm":
        if not args.url or not args.model:
            parser.error("--backend llm needs --url and --model")
        cache = N.AnswerCache(out.with_suffix(".cache.jsonl"))
        backend = N.LLMBackend(args.url, args.model, os.environ.get(args.api_key_env, ""), cache, args.max_retries)
    else:
        backend = N.RuleBackend(args.seed)

    lines = [json.loads(line) for line in Path(args.inp).read_text().splitlines() if line.strip()]
    records = [(str(r.get("id", i)).replace(".", "_"), r["caption"]) for i, r in enumerate(lines)]

    def work(record):
        return record, N.negatives_for(backend, *record, args.num_negatives, types, args.seed)

    from tqdm import tqdm

    counts, short = Counter(), 0
    rejects_file, short_file = out.with_suffix(".rejects.jsonl"), out.with_suffix(".short.jsonl")
    with ThreadPoolExecutor(max(args.concurrency, 1)) as pool, open(out, "w") as sink, \
            open(rejects_file, "w") as rejects, open(short_file, "w") as shorts:
        for (rid, caption), (accepted, rejected, not_applicable) in tqdm(pool.map(work, records), total=len(records),
                                                                         desc="negatives", unit="caption"):
            sink.write(json.dumps({"id": rid, "negatives": [n for _, n in accepted], "types": [t for t, _ in accepted]}) + "\n")
            for r in rejected:
                rejects.write(json.dumps(r) + "\n")
            if len(accepted) < args.num_negatives:
                short += 1
                shorts.write(json.dumps({"id": rid, "caption": caption, "got": len(accepted), "needed": args.num_negatives,
                                         "why": shortfall_reason(not_applicable, rejected)}) + "\n")
            counts.update(accepted=len(accepted), not_applicable=len(not_applicable),
                          **Counter(f"rejected_{r['reason']}" for r in rejected))
    report = {"captions": len(records), **counts, "short_captions": short, "asked": getattr(backend, "asked", 0)}
    print(json.dumps(report))
    if short:
        print(f"{short} of {len(records)} captions got fewer than {args.num_negatives} negatives (listed in {short_file}): "
              + ADVICE[args.backend].format(rejects=rejects_file), file=sys.stderr)
    return 1 if short and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
