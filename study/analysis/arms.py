"""Beyond the paper: the follow-ups' answers to degradation (issue 31), judged like the paper's claims.

An *arm* is a net of the study other than the paper's two: the pre-activation ResNet (`preact`), or a
net with a follow-up's initialisation (`resnet+zeroinit`, `plain+deltaorth`; `load.net_of`). For each
arm trained at two depths, the report asks two questions, with the same statistics as the claims
(difference of the means, Welch's 95% interval, the per-seed order):

1. Does it improve with depth? For a plain arm, a yes removes the plain net's degradation; for a
   residual arm, it keeps the residual gain.
2. Does its deep net train better than the paper's net of the same kind and depth (plain or ResNet)?
"""

from __future__ import annotations

from .paper import PAPER_ARCHS, series_label

YES, NO, UNKNOWN = "yes", "no", "cannot be judged"


def reference_of(arm: str) -> str:
    """The paper's net an arm is compared with: `plain` for a plain arm, else `resnet`."""
    return "plain" if arm.partition("+")[0] == "plain" else "resnet"


def arms_in(finals) -> list[str]:
    """The arms among the study's finished nets (`report._Finals`), in a fixed order."""
    if finals is None or finals.df is None:
        return []
    nets = set(finals.df.loc[finals.df["shortcut"] == "A", "arch"])
    return sorted(nets - set(PAPER_ARCHS), key=lambda a: (reference_of(a) != "plain", a))


def judge_arms(finals) -> list:
    """The report's findings on every arm of the study (`report.Claim`s: the question as the text,
    `yes`/`no` as the verdict); empty when the study has none."""
    from .report import Claim, _pair, _significance, compare

    findings = []
    for arm in arms_in(finals):
        ref = reference_of(arm)
        pair = _pair(finals.depths(arm), (20, 56))
        if pair is None:
            findings.append(Claim(len(findings) + 1, f"the `{arm}` arm: does it improve with depth?", UNKNOWN,
                                  f"needs two finished depths, has {finals.depths(arm) or 'none'}", 0))
            continue
        shallow, deep = pair
        name_s, name_d, name_r = series_label(arm, shallow), series_label(arm, deep), series_label(ref, deep)
        tr_s, tr_d = finals.get(arm, shallow, "train"), finals.get(arm, deep, "train")
        te_s, te_d = finals.get(arm, shallow, finals.eval), finals.get(arm, deep, finals.eval)
        question = f"{name_s} to {name_d}: does it improve with depth" + (
            " (no degradation)?" if ref == "plain" else " (the residual gain kept)?")
        if None in (tr_s, tr_d, te_s, te_d):
            findings.append(Claim(len(findings) + 1, question, UNKNOWN,
                                  f"{name_s} or {name_d} lacks a final training or {finals.eval} error", 0))
        elif (why := finals.unlearned([tr_s, tr_d])) is not None:
            findings.append(Claim(len(findings) + 1, question, UNKNOWN, why, min(tr_s.n, tr_d.n)))
        else:
            train, test = compare(tr_d, tr_s), compare(te_d, te_s)
            better = tr_d.mean < tr_s.mean and te_d.mean < te_s.mean
            findings.append(Claim(
                len(findings) + 1, question, YES if better else NO,
                f"training error {name_d} {tr_d} vs {name_s} {tr_s} ({train}), {finals.eval} error {te_d} vs "
                f"{te_s} ({test})", min(tr_s.n, tr_d.n), _significance([(train, False), (test, False)], better)))
        question = f"does {name_d} train better than the paper's {name_r}?"
        tr_r, te_r = finals.get(ref, deep, "train"), finals.get(ref, deep, finals.eval)
        if None in (tr_d, tr_r):
            findings.append(Claim(len(findings) + 1, question, UNKNOWN, f"{name_d} or {name_r} lacks a final training error", 0))
            continue
        if (why := finals.unlearned([tr_d, tr_r])) is not None:
            findings.append(Claim(len(findings) + 1, question, UNKNOWN, why, min(tr_d.n, tr_r.n)))
            continue
        train = compare(tr_d, tr_r)
        evidence = f"training error {name_d} {tr_d} vs {name_r} {tr_r} ({train})"
        if te_d is not None and te_r is not None:
            # Beside the answer, not part of it: the question is of training (optimisation), as in the paper.
            evidence += f"; {finals.eval} error, beside it (not judged): {te_d} vs {te_r} ({compare(te_d, te_r)})"
        better = tr_d.mean < tr_r.mean
        findings.append(Claim(len(findings) + 1, question, YES if better else NO, evidence,
                              min(tr_d.n, tr_r.n), _significance([(train, False)], better)))
    return findings
