"""Peak memory of lm_eval's `loglikelihood_rolling` through the `armt` model, against document length.

    OMP_NUM_THREADS=1 python -m bench.harness_memory --tokens 10k,100k,1M --output harness_memory.json

Each length runs in a fresh process (peak RSS is per process: resource.getrusage's ru_maxrss), which scores one
document of that many GPT-2 tokens of Austen prose (the offline haystack, wrapped around) with
`ARMTLM.loglikelihood_rolling`. Reported: tokens, seconds, peak RSS before the request (model, tokenizer, text
loaded) and after it, and the log-likelihood.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DEFAULT_TOKENS = "10k,100k,1M"


def measure(model: str, tokens: int, threads: int) -> dict:
    """One document of about `tokens` tokens through loglikelihood_rolling, in this process."""
    import resource
    import time

    from lm_eval.api.instance import Instance

    from eval.harness.model import ARMTLM
    from eval.haystack import load_haystack
    from eval.tokenizer import gpt2_tokenizer

    lm = ARMTLM(pretrained=model, device="cpu", threads=threads)
    haystack = load_haystack("austen", gpt2_tokenizer())
    indices, _ = haystack.take(0, tokens)
    text = " ".join(haystack.sentences[i] for i in indices)
    del haystack, indices
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    start = time.perf_counter()
    [logprob] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    seconds = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": int(len(lm.encode(text, special_prefix=False))), "seconds": round(seconds, 1),
            "rss_before_mib": round(rss_before), "rss_peak_mib": round(rss_peak), "logprob": logprob,
            "chunk_size": lm.chunk_size, "threads": threads, "model": model}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.harness_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="ARMT model folder (default: the project's models/armt-babilong-qa1)")
    parser.add_argument("--tokens", default=DEFAULT_TOKENS, help=f"document lengths (default {DEFAULT_TOKENS})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--output", help="write the records as JSON here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # one length, in this process
    args = parser.parse_args(argv)
    from eval.common import DEFAULT_MODEL
    from eval.data import parse_length

    model = args.model or str(DEFAULT_MODEL)
    if args.worker:
        print(json.dumps(measure(model, args.worker, args.threads)))
        return
    try:
        lengths = [parse_length(n) for n in args.tokens.split(",")]
    except ValueError as err:
        parser.error(str(err))
    records = []
    for tokens in lengths:
        # a fresh process per length: ru_maxrss is the peak of the whole process
        done = subprocess.run([sys.executable, "-m", "bench.harness_memory", "--worker", str(tokens), "--model",
                               model, "--threads", str(args.threads)], stdout=subprocess.PIPE, text=True, check=True)
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = records[-1]
        print(f"{r['tokens']:>9} tokens  {r['seconds']:>7.1f} s  RSS before {r['rss_before_mib']} MiB  "
              f"peak {r['rss_peak_mib']} MiB  log-likelihood {r['logprob']:.1f}", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
