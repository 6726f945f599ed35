"""KL to the base (posttrain/evaluation/kl.py), the forgetting predictors (posttrain/analysis/predictors.py)
and the `kl_predicts_forgetting` finding."""

import copy
import itertools
import math

import pandas as pd
import pytest
import torch

from posttrain.analysis.predictors import line_fit, points_from_results, pooled_points, predictor_fits, ranks, spearman
from posttrain.evaluation.kl import kl_estimate, kl_to_base, sample, sequence_logprobs


def test_kl_estimate_hand_computed():
    # S = [4, 2], L = [2, 4], n = 2: per_seq = 6/4; S/n = [2, 1] -> sd 1/sqrt2, se 1/2;
    # per_token = 6/6 = 1; residuals S - L = [2, -2] -> sqrt(8 / 2) / mean(L) = 2/3
    est = kl_estimate(torch.tensor([[1.0, 3.0], [0.0, 2.0]]), torch.tensor([[1, 1], [2, 2]]))
    assert est["per_seq"] == pytest.approx(1.5) and est["per_seq_se"] == pytest.approx(0.5)
    assert est["per_token"] == pytest.approx(1.0) and est["per_token_se"] == pytest.approx(2 / 3)
    assert est["mean_tokens"] == pytest.approx(1.5)
    one = kl_estimate(torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 1]]))
    assert one["per_seq"] == pytest.approx(1.5) and one["per_seq_se"] is None
    with pytest.raises(ValueError):
        kl_estimate(torch.zeros(2, 3), torch.ones(3, 2))


def _markov_kl(p1, p2, q1, q2):
    """Exact KL(p || q) between two-token sequence distributions p(a) p(b|a) and q(a) q(b|a)."""
    return sum(p1[a] * p2[a, b] * math.log(p1[a] * p2[a, b] / (q1[a] * q2[a, b]))
               for a, b in itertools.product(range(len(p1)), repeat=2))


def test_kl_estimate_converges_to_the_exact_kl_of_a_two_token_toy():
    # sequences y = (a, b) from a first-token categorical and a transition matrix; the exact KL of the
    # sequence distributions by enumeration; the estimate sums the per-token log-ratios (chain rule)
    g = torch.Generator().manual_seed(0)
    p1, q1 = torch.tensor([0.98, 0.01, 0.01]), torch.tensor([0.4, 0.3, 0.3])
    p2 = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
    q2 = torch.tensor([[0.3, 0.4, 0.3], [0.1, 0.8, 0.1], [0.6, 0.2, 0.2]])
    exact_pq, exact_qp = _markov_kl(p1, p2, q1, q2), _markov_kl(q1, q2, p1, p2)
    assert abs(exact_pq - exact_qp) > 0.2  # the two directions differ: swapping them would fail below

    def estimate(f1, f2, g1, g2, prompts, n):
        a = torch.multinomial(f1, prompts * n, replacement=True, generator=g)
        b = torch.multinomial(f2[a], 1, generator=g).squeeze(-1)
        s = (f1[a].log() + f2[a, b].log() - g1[a].log() - g2[a, b].log()).view(prompts, n)
        return kl_estimate(s, torch.full((prompts, n), 2))

    small, big = estimate(p1, p2, q1, q2, 50, 4), estimate(p1, p2, q1, q2, 5000, 4)
    assert big["per_seq_se"] < small["per_seq_se"] / 5  # SE shrinks like 1/sqrt(prompts)
    assert abs(big["per_seq"] - exact_pq) < 4 * big["per_seq_se"] and abs(big["per_seq"] - exact_pq) < 0.02
    assert big["per_token"] == pytest.approx(big["per_seq"] / 2)  # every sequence has 2 tokens
    rev = estimate(q1, q2, p1, p2, 5000, 4)
    assert abs(rev["per_seq"] - exact_qp) < 4 * rev["per_seq_se"]


def test_spearman_with_ties_and_without():
    assert ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]: sum dxdy 4.5, sum dx^2 4.5, sum dy^2 5 -> 4.5 / sqrt(22.5)
    x, y = [1, 2, 2, 3], [1, 3, 2, 4]
    assert spearman(x, y) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman(x, y) == pytest.approx(pd.Series(x).corr(pd.Series(y), method="spearman"))
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)) with d = [-1, 1, -1, 1, 0]: 1 - 24 / 120
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # constant: undefined, not 0 and not NaN


def test_line_fit_hand_computed():
    # (0,0), (1,1), (2,1): slope 1/2, intercept 1/6, SS_res 1/6, SS_tot 2/3 -> R^2 = 3/4
    fit = line_fit([0, 1, 2], [0, 1, 1])
    assert fit["slope"] == pytest.approx(0.5) and fit["intercept"] == pytest.approx(1 / 6)
    assert fit["r2"] == pytest.approx(0.75)
    assert line_fit([0, 1], [0, 1]) is None and line_fit([1, 1, 1], [0, 1, 2]) is None


def _results(forgetting, kl, rel_update):
    names = [f"m{i}" for i in range(len(forgetting))]
    acc = {"id_acc": 0.5, "ood_acc": 0.5, "retention": {"facts": 0.5}}
    return {"models": {"base": acc, **{n: acc for n in names}},
            "forgetting": dict(zip(names, forgetting)),
            "diagnostics": {n: {"rel_update_total": u} for n, u in zip(names, rel_update)},
            "kl_to_base": {n: {"kl_pi0_pi_per_seq": k, "kl_pi_pi0_per_seq": k / 2, "kl_pi0_pi_per_token": k / 10,
                               "kl_pi_pi0_per_token": k / 20} for n, k in zip(names, kl)}}


def _verdict(results):
    from posttrain.config import StudyConfig
    from posttrain.findings import Context
    from posttrain.findings.kl import kl_predicts_forgetting

    return kl_predicts_forgetting(Context(results, StudyConfig(methods={})))


def test_predictor_fits_from_results():
    res = _results([0.1, 0.2, 0.3], [1.0, 2.0, 4.0], [0.3, 0.2, None])
    pts = points_from_results(res)
    assert [p["name"] for p in pts] == ["m0", "m1", "m2"] and pts[2]["rel_update_total"] is None
    fits = predictor_fits(pts)
    assert fits["kl_pi0_pi_per_seq"]["n"] == 3 and fits["kl_pi0_pi_per_seq"]["rho"] == pytest.approx(1.0)
    assert fits["rel_update_total"]["n"] == 2 and fits["rel_update_total"]["rho"] == pytest.approx(-1.0)
    assert fits["rel_update_total"]["r2"] is None  # two points fit any line


def test_kl_predicts_forgetting_holds_fails_and_is_untestable():
    forg = [0.01, 0.05, 0.02, 0.20, 0.10, 0.07, 0.15]
    kl = [0.5, 2.0, 1.0, 9.0, 4.0, 3.0, 6.0]  # same order as forgetting
    upd = [0.02, 0.01, 0.03, 0.05, 0.015, 0.04, 0.025]  # weakly related
    holds, evidence, stats = _verdict(_results(forg, kl, upd))
    assert holds is True and stats["rho"] == pytest.approx(1.0) and stats["n_models"] == 7
    assert 0 < stats["r2"] <= 1 and "better than the weight-update norm" in evidence and "R^2" in evidence
    # a null: KL values unrelated to forgetting (rank correlation about 0)
    null = [6.0, 0.5, 9.0, 1.0, 4.0, 2.0, 3.0]
    holds, evidence, stats = _verdict(_results(forg, null, upd))
    assert holds is False and stats["rho"] < 0.7
    # the weight update ranks forgetting perfectly and the KL does not: KL is no better
    holds, evidence, _ = _verdict(_results(forg, null, forg))
    assert holds is False and "no better than the weight-update norm" in evidence
    # five models: untestable, and says how many there are
    holds, evidence, stats = _verdict(_results(forg[:5], kl[:5], upd[:5]))
    assert holds is None and "5 trained models" in evidence and "at least 6" in evidence and stats["n_models"] == 5
    # models without a KL do not count: 7 models, 2 of them without
    res = _results(forg, kl, upd)
    del res["kl_to_base"]["m0"], res["kl_to_base"]["m3"]
    holds, evidence, _ = _verdict(res)
    assert holds is None and "5 trained models" in evidence


def test_pooling_seeds_makes_the_claim_testable():
    # two methods per seed are untestable alone; three seeds pooled are six models
    from posttrain.findings.kl import kl_verdict

    seeds = {f"seed-{s}": _results([0.2 + s / 100, 0.05 + s / 100], [8.0 + s, 2.0 + s], [0.09, 0.02]) for s in range(3)}
    assert kl_verdict(points_from_results(seeds["seed-0"]))[0] is None
    pts = pooled_points(seeds)
    assert len(pts) == 6 and pts[0]["name"] == "seed-0/m0" and pts[5]["name"] == "seed-2/m1"
    holds, evidence, stats = kl_verdict(pts)
    assert stats["n_models"] == 6 and holds is (stats["rho"] >= 0.7) and holds is True


# ---- the estimator on real models -------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(tiny_checkpoint):
    """Two tiny models whose next-token distributions are peaked and clearly different."""
    from posttrain.models.loading import load_model

    base, tok = load_model(tiny_checkpoint, device="cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head = base.get_output_embeddings().weight
        head.mul_(40.0)
        model = copy.deepcopy(base)
        model.get_output_embeddings().weight.add_(torch.randn(head.shape, generator=g) * head.std())
    return model.eval(), base.eval(), tok


def _exact_first_token_kl(p_model, q_model, tok, prompts):
    """E_x sum_v p(v|x) log(p(v|x) / q(v|x)) at the first completion position, from full forwards."""
    from posttrain.train.sequences import encode_prompts

    out = []
    for ids in encode_prompts(tok, prompts):
        x = torch.tensor([ids])
        lp = torch.log_softmax(p_model(input_ids=x).logits[0, -1].float(), -1)
        lq = torch.log_softmax(q_model(input_ids=x).logits[0, -1].float(), -1)
        out.append(float((lp.exp() * (lp - lq)).sum()))
    return sum(out) / len(out)


@torch.no_grad()
def test_kl_to_base_matches_the_exact_kl_of_one_token_completions(two_models):
    # one-token completions: the sequence KL is the KL of the first next-token distributions, exactly
    # computable; the estimate (sampler + training forward) must converge to it in both directions
    model, base, tok = two_models
    prompts = ["pts 1 2 3:", "arith 7+5:", "str rev abc:"]
    exact_fwd = _exact_first_token_kl(model, base, tok, prompts)
    exact_rev = _exact_first_token_kl(base, model, tok, prompts)
    assert abs(exact_fwd - exact_rev) > 0.15 * exact_rev
    n = 400  # Monte Carlo error about 1% here (fixed seeds: deterministic)
    base_samples = sample(base, tok, prompts, n, 1, seed=1)
    est = kl_to_base(model, base, tok, base_samples, prompts, 1, seed=2)
    assert est["mean_tokens_pi"] == 1 and est["mean_tokens_pi0"] == 1
    # the directions differ by 20%: a swap (or scoring the wrong model) fails the 5% tolerance
    for key, exact in (("kl_pi_pi0", exact_fwd), ("kl_pi0_pi", exact_rev)):
        assert est[f"{key}_per_seq"] == pytest.approx(exact, rel=0.05), key
        assert est[f"{key}_per_token"] == pytest.approx(est[f"{key}_per_seq"])


@torch.no_grad()
def test_kl_of_a_model_to_itself_is_exactly_zero_and_log_probs_are_sampler_consistent(two_models):
    model, base, tok = two_models
    prompts = ["pts 1 2 3:", "arith 7+5:"]
    s = sample(base, tok, prompts, 3, 6, seed=0)
    est = kl_to_base(base, base, tok, s, prompts, 6, seed=0)
    for d in ("kl_pi_pi0", "kl_pi0_pi"):
        assert est[f"{d}_per_seq"] == 0.0 and est[f"{d}_per_token"] == 0.0
    # the same seed draws the same completions, and the log-probs count every completion token (EOS included)
    again = sample(base, tok, prompts, 3, 6, seed=0)
    assert again.completion_ids == s.completion_ids and torch.equal(again.logp, s.logp)
    assert s.tokens.flatten().tolist() == [len(c) for c in s.completion_ids]
    assert bool((s.logp < 0).all())
    # scoring in batches of one group gives the training forward's numbers for the whole set
    lp, _ = sequence_logprobs(base, s.prompt_ids, s.completion_ids, 3, tok.pad_token_id, batch_rows=3)
    assert torch.allclose(lp, s.logp, atol=1e-5)
    with pytest.raises(ValueError, match="other prompts"):
        kl_to_base(model, base, tok, s, prompts[:1], 6, seed=0)



def test_kl_verdict_evidence_word_for_word():
    from posttrain.findings.kl import kl_verdict

    forg = [0.01, 0.05, 0.02, 0.20, 0.10, 0.07, 0.15]

    def pts(kl, upd):
        return [{"name": f"m{i}", "forgetting": f, "kl_pi0_pi_per_seq": k, "rel_update_total": u}
                for i, (f, k, u) in enumerate(zip(forg, kl, upd))]

    kl = [10 * f for f in forg]  # a line through forgetting: rho 1, R^2 1
    head = ("7 models, KL(pi0 || pi) per sequence (RL's Razor): rho +1.00, R^2 1.00; "
            "KL(pi || pi0) per sequence: rho undefined, R^2 undefined; relative weight update ||dW|| / ||W0||: ")
    holds, evidence, stats = kl_verdict(pts(kl, [2 * f for f in forg]))
    assert holds is True and evidence == head + (
        "rho +1.00, R^2 1.00; KL predicts forgetting no better than the weight-update norm (rho +1.00 vs +1.00)")
    assert stats == {"n_models": 7, "rho": pytest.approx(1.0), "r2": pytest.approx(1.0),
                     "rho_rel_update": pytest.approx(1.0), "r2_rel_update": pytest.approx(1.0)}
    holds, evidence, _ = kl_verdict(pts(kl, [1 - f for f in forg]))
    assert holds is True and evidence == head + (
        "rho -1.00, R^2 1.00; KL predicts forgetting better than the weight-update norm (rho +1.00 vs -1.00)")
    # no weight updates: nothing to compare with
    holds, evidence, stats = kl_verdict(pts(kl, [None] * 7))
    assert holds is True and evidence == head + "rho undefined, R^2 undefined"
    assert stats["rho_rel_update"] is None and stats["r2_rel_update"] is None
    # the same KL for every model: rho is undefined, so is the verdict
    holds, evidence, _ = kl_verdict(pts([1.0] * 7, [None] * 7))
    assert holds is None and evidence.endswith("R^2 undefined (forgetting or KL constant across models)")
    # too few models: how many, and the fit so far from two on
    assert kl_verdict(pts(kl[:1], [None]))[:2] == (
        None, "untestable: 1 trained model with forgetting and KL, needs at least 6")
    assert kl_verdict(pts(kl[:2], [None] * 2))[:2] == (
        None, "untestable: 2 trained models with forgetting and KL, needs at least 6 (so far rho +1.00, R^2 undefined)")
    assert kl_verdict(pts([1.0, 1.0], [None] * 2))[1].endswith("(so far rho undefined, R^2 undefined)")


def test_kl_predicts_forgetting_at_exactly_the_threshold(monkeypatch):
    import posttrain.findings.kl as kl

    fit = {"n": 6, "rho": kl.RHO, "r2": 0.5, "slope": 1.0, "intercept": 0.0}
    monkeypatch.setattr(kl, "predictor_fits", lambda points: {k: dict(fit) for k in kl.PREDICTORS})
    assert kl.kl_verdict([])[0] is True  # rho >= 0.7 holds


def test_line_fit_intercept_away_from_x_mean_one_and_undefined_fits():
    # y = 1 + 2x through x = 1..4 (mean 2.5): slope 2, intercept 6 - 2 * 2.5 = 1
    fit = line_fit([1, 2, 3, 4], [3, 5, 7, 9])
    assert fit == {"r2": pytest.approx(1.0), "slope": pytest.approx(2.0), "intercept": pytest.approx(1.0)}
    fits = predictor_fits([{"forgetting": 0.1, "kl_pi0_pi_per_seq": 1.0}, {"forgetting": 0.2, "kl_pi0_pi_per_seq": 2.0}])
    assert fits["kl_pi0_pi_per_seq"] == {"n": 2, "rho": pytest.approx(1.0), "r2": None, "slope": None, "intercept": None}


def test_pearson_by_hand_bounded_and_undefined():
    from posttrain.analysis.predictors import pearson

    # dx = (-1.5, -0.5, 0.5, 1.5), dy = (-0.5, -0.5, 0.5, 0.5): 2 / sqrt(5 * 1)
    assert pearson([1, 2, 3, 4], [0, 0, 1, 1]) == pytest.approx(2 / math.sqrt(5))
    assert pearson([1, 2, 3], [5, 5, 5]) is None and pearson([1], [2]) is None
    # rounding would give 1.0000000000000002 here: r stays within [-1, 1]
    x = [0.7, 0.7, 0.2, 0.7]
    assert pearson(x, x) == 1.0 and pearson(x, [-v for v in x]) == -1.0
    with pytest.raises(ValueError, match="^pearson: 2 x values and 3 y values$"):
        pearson([1, 2], [1, 2, 3])
