"""How far each pair layout's log-probs are from the model's own forward, per architecture.

For every architecture of the test matrix (tests/architectures.py: tiny models built from
config, random weights) and every layout, scores random pairs up to 56 tokens long both ways and
prints the largest |difference| of a sequence's summed log-prob, in nats, as a Markdown table.
The ground truth is a forward of each ``prompt + response`` alone, unpadded.

    python bench/exactness.py [--pairs 16] [--seeds 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preftune.objectives.settings import SpeedSettings
from preftune.objectives.speed import PairScoring, choose_scoring
from tests.architectures import ARCHITECTURES, INEXPRESSIBLE, build
from tests.test_architectures import alone, random_pairs, score

LAYOUTS = {
    "plain": PairScoring(),
    "plain, chunked": PairScoring(logits_chunk=7),
    "prefix sharing": PairScoring(prefix_sharing=True, logits_chunk=7),
    "packing": PairScoring(packing=True, logits_chunk=7),
    "both": PairScoring(prefix_sharing=True, packing=True, logits_chunk=7),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16, help="pairs per seed")
    parser.add_argument("--seeds", type=int, default=3, help="random pair sets per architecture")
    args = parser.parse_args()
    print("| architecture | " + " | ".join(LAYOUTS) + " | levers on this model |")
    print("|---" * (len(LAYOUTS) + 2) + "|")
    for name in [*ARCHITECTURES, *INEXPRESSIBLE]:
        model = build(name).eval()
        chosen, line = choose_scoring(model, SpeedSettings())
        errors = dict.fromkeys(LAYOUTS, 0.0)
        for seed in range(args.seeds):
            pairs = random_pairs(args.pairs, seed)
            truth = alone(model, pairs)
            for label, scoring in LAYOUTS.items():
                # The layouts preftune would turn off on this model, it would not run.
                if scoring.laid_out and not chosen.laid_out:
                    errors[label] = float("nan")
                    continue
                with torch.no_grad():
                    logps, _ = score(model, pairs, scoring)
                errors[label] = max(errors[label], float((logps - truth).abs().max()))
        cells = ["off" if e != e else f"{e:.1e}" for e in errors.values()]
        verdict = "exact" if line is None else "layouts off: " + line.split(": ", 2)[-1]
        print(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")


if __name__ == "__main__":
    main()
