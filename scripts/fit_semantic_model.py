#!/usr/bin/env python3
"""Fits the semantic cache's calibrated decision and reports it on domains it was not fitted on.

Input: the pairs `examples/semantic_pairs.rs` writes (one request a line, its nearest earlier
entries with their features and whether they share the request's answer). Output:

- `--report FILE`: leave-one-domain-out figures. For each domain D, the model is fitted on the
  other domains only, its cut-off for the promised false-hit rate is chosen on the other domains
  only (from predictions on domains held out of that fit, so the cut-off is not chosen on the data
  the weights saw), and then D is scored: hits on true repeats, wrong answers among served repeats,
  false hits on hard negatives. Nothing of D takes part in any choice.
- `--model FILE`: the model fitted on every domain, with its operating points (cut-off and the
  false-hit, wrong and hit rates measured on held-out domains), as `src/cache/semantic/model.json`
  ships it. The gateway maps `semantic.max_false_hit_rate` to a cut-off with these points.

A request is served the candidate of highest probability if that probability reaches the cut-off,
as the gateway does.

`python3 scripts/fit_semantic_model.py PAIRS.jsonl --model M.json --report R.md` (`make fit`).
"""
import argparse
import json
import sys
from collections import defaultdict

import numpy as np
from sklearn.linear_model import LogisticRegression

FEATURES = [
    "cosine", "align_mean", "align_min", "unshared_align_min", "unshared_words",
    "unshared_both_sides", "jaccard", "numbers_differ", "numbers_one_side", "times_differ",
    "times_one_side", "negation_flip", "polarity_flip", "entities_differ", "entity_one_side",
    "substitution", "content_length_gap", "extra_one_side", "extra_align_min", "swap_similarity",
]
VETOES = ["numbers_differ", "numbers_one_side", "times_differ", "times_one_side", "negation_flip",
          "polarity_flip"]
HARD_NEGATIVE_KINDS = {"slot_change", "sibling_intent", "parameters", "sibling", "negation"}
# Candidates below this similarity are not worth scoring (the pairs file holds them from 0.4).
MIN_SIMILARITY = 0.5
C = 1.0


def load(path):
    requests = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            # A vetoed pair is refused by rule, whatever the model would say: it takes no part in
            # the fit and is never served.
            row["candidates"] = [c for c in row["candidates"]
                                 if c["features"][0] >= MIN_SIMILARITY and not any(
                                     c["features"][FEATURES.index(v)] > 0 for v in VETOES)]
            requests.append(row)
    return requests


def matrix(requests):
    xs, ys = [], []
    for r in requests:
        for c in r["candidates"]:
            xs.append(c["features"])
            ys.append(1 if c["same_group"] else 0)
    return np.array(xs, dtype=np.float64), np.array(ys)


class Model:
    def __init__(self, requests):
        x, y = matrix(requests)
        self.mean = x.mean(axis=0)
        self.scale = x.std(axis=0)
        self.scale[self.scale == 0] = 1.0
        self.fit = LogisticRegression(C=C, max_iter=2000, class_weight=None)
        self.fit.fit((x - self.mean) / self.scale, y)

    def probabilities(self, features):
        x = (np.array(features, dtype=np.float64) - self.mean) / self.scale
        return self.fit.predict_proba(x)[:, 1]


def probabilities(model, requests):
    """Each request's candidates' probabilities (an array per request, maybe empty)."""
    features = [c["features"] for r in requests for c in r["candidates"]]
    p = model.probabilities(features) if features else np.array([])
    out, at = [], 0
    for r in requests:
        n = len(r["candidates"])
        out.append(p[at:at + n])
        at += n
    return out


def serve(request, p, cutoff, margin):
    """What the gateway serves: the candidate of highest probability if it reaches the cut-off
    and no candidate with another answer comes within `margin` of it (two entries that both
    match but were answered differently: the wording does not decide which answer is meant).
    Returns (served, correct)."""
    if len(p) == 0:
        return False, False
    best = int(np.argmax(p))
    if p[best] < cutoff:
        return False, False
    answer = request["candidates"][best]["group"]
    for j, c in enumerate(request["candidates"]):
        if j != best and c["group"] != answer and p[j] >= p[best] - margin:
            return False, False
    return True, bool(request["candidates"][best]["same_group"])


def score(requests, probs, cutoff, margin):
    t = dict(hit=0, served=0, wrong=0, negatives=0, false_hits=0)
    for r, p in zip(requests, probs):
        served, correct = serve(r, p, cutoff, margin)
        if r["expect"] == "hit":
            t["hit"] += 1
            if served:
                t["served"] += 1
                t["wrong"] += 0 if correct else 1
        elif r["kind"] in HARD_NEGATIVE_KINDS:
            t["negatives"] += 1
            t["false_hits"] += 1 if served and not correct else 0
    return dict(
        hit_rate=t["served"] / max(t["hit"], 1),
        wrong_rate=t["wrong"] / max(t["served"], 1),
        false_hit_rate=t["false_hits"] / max(t["negatives"], 1),
        **t,
    )


def held_out_probabilities(requests):
    """Each domain's probabilities from a model fitted without it: predictions no weight saw."""
    by_domain = defaultdict(list)
    for i, r in enumerate(requests):
        by_domain[r["domain"]].append(i)
    probs = [None] * len(requests)
    for domain, members in by_domain.items():
        model = Model([r for r in requests if r["domain"] != domain])
        for i, p in zip(members, probabilities(model, [requests[i] for i in members])):
            probs[i] = p
    return probs


CUTOFFS = [float(c) for c in np.round(np.arange(0.30, 0.995, 0.005), 3)]
MARGINS = [0.2, 0.3, 0.5]


def operating_points(requests, probs, margin):
    return [dict(cutoff=c, **{k: round(v, 4) for k, v in score(requests, probs, c, margin).items()
                              if k.endswith("_rate")})
            for c in CUTOFFS]


def choose(requests, probs, rate):
    """The margin and cut-off that serve the most held-out repeats within the rate."""
    best = None
    for margin in MARGINS:
        points = operating_points(requests, probs, margin)
        cutoff = cutoff_for(points, rate)
        hit_rate = next(p["hit_rate"] for p in points if p["cutoff"] == cutoff)
        if best is None or hit_rate > best[2]:
            best = (margin, cutoff, hit_rate)
    return best[0], best[1]


def cutoff_for(points, rate):
    """The lowest cut-off at which the held-out false-hit rate is within `rate` and the wrong
    rate among served repeats within twice it; every higher cut-off must hold as well."""
    chosen = None
    for point in reversed(points):
        if point["false_hit_rate"] <= rate and point["wrong_rate"] <= 2 * rate:
            chosen = point["cutoff"]
        else:
            break
    return chosen if chosen is not None else points[-1]["cutoff"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("pairs")
    parser.add_argument("--model", help="write the model fitted on every domain here")
    parser.add_argument("--report", help="write the leave-one-domain-out figures here")
    parser.add_argument("--exclude", default="",
                        help="comma-separated domains left out of everything (a fold)")
    parser.add_argument("--rate", type=float, default=0.01,
                        help="the false-hit rate the report's decisions promise")
    args = parser.parse_args()
    excluded = {d for d in args.exclude.split(",") if d}
    requests = [r for r in load(args.pairs) if r["domain"] not in excluded]
    domains = sorted({r["domain"] for r in requests})

    if args.report:
        lines = [
            f"Promised false-hit rate {args.rate}: every domain scored by a model and a cut-off "
            "chosen without it.", "",
            "| left out | margin | cut-off | correct hits on true repeats | wrong among served repeats "
            "| false hits on hard negatives | true repeats | hard negatives |",
            "|" + "---|" * 8,
        ]
        totals = defaultdict(int)
        for domain in domains:
            train = [r for r in requests if r["domain"] != domain]
            test = [r for r in requests if r["domain"] == domain]
            # The cut-off is chosen on predictions for training domains that their own fit did
            # not see, so it is not flattered by the weights having learnt those domains.
            margin, cutoff = choose(train, held_out_probabilities(train), args.rate)
            s = score(test, probabilities(Model(train), test), cutoff, margin)
            for k in ("hit", "served", "wrong", "negatives", "false_hits"):
                totals[k] += s[k]
            correct = (s["served"] - s["wrong"]) / max(s["hit"], 1)
            lines.append(
                f"| {domain} | {margin} | {cutoff:.3f} | {correct:.1%} | "
                f"{s['wrong_rate']:.1%} | {s['false_hit_rate']:.1%} | {s['hit']} | "
                f"{s['negatives']} |")
            print(lines[-1], file=sys.stderr)
        lines.append(
            f"| **all, each held out** | | | "
            f"**{(totals['served'] - totals['wrong']) / max(totals['hit'], 1):.1%}** | "
            f"**{totals['wrong'] / max(totals['served'], 1):.1%}** | "
            f"**{totals['false_hits'] / max(totals['negatives'], 1):.1%}** | {totals['hit']} | "
            f"{totals['negatives']} |")
        print(lines[-1], file=sys.stderr)
        with open(args.report, "w") as f:
            f.write("\n".join(lines) + "\n")

    if args.model:
        model = Model(requests)
        probs = held_out_probabilities(requests)
        margin, _ = choose(requests, probs, args.rate)
        points = operating_points(requests, probs, margin)
        shipped = dict(
            kind="logistic",
            features=FEATURES,
            vetoes=VETOES,
            mean=[round(float(v), 6) for v in model.mean],
            scale=[round(float(v), 6) for v in model.scale],
            weights=[round(float(v), 6) for v in model.fit.coef_[0]],
            bias=round(float(model.fit.intercept_[0]), 6),
            min_similarity=MIN_SIMILARITY,
            rival_margin=margin,
            fitted_on=dict(domains=domains, requests=len(requests),
                           pairs=int(sum(len(r["candidates"]) for r in requests))),
            operating_points=points,
        )
        with open(args.model, "w") as f:
            json.dump(shipped, f, indent=1)
            f.write("\n")
        for rate in (0.005, 0.01, 0.02, 0.05):
            print(f"max_false_hit_rate {rate}: cut-off {cutoff_for(points, rate)}",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
