"""GRPO math against plain-Python references; log-probs against full log-softmax and generate(); a tiny run."""

import math
import statistics

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from branchmerge.models.training.config import RLConfig
from branchmerge.models.training.grpo import (
    GRPOModule,
    completion_hidden,
    completion_mask_from_ids,
    compute_advantages,
    entropy_from_hidden,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    high_entropy_mask,
    informative_groups,
    kl_per_token,
    overlong_penalty,
    logprobs_and_entropy,
    logprobs_from_logits,
    selective_logprobs,
    train_grpo,
)

# ----------------------------------------------------------------------------------------------- advantages

REWARDS = [1.0, 0.0, 0.5, 1.0,  # mixed
           0.3, 0.3, 0.3, 0.3,  # zero std: advantage 0
           None, 1.0, 0.0, None,  # Nones are left out of the baseline
           None, None, None, None,  # nothing to learn
           2.0, None, 0.0, 0.5]  # one None


def reference_advantages(rewards, G, scale):
    valid = [r for r in rewards if r is not None]
    batch_std = statistics.stdev(valid)  # unbiased, as torch.std
    out = []
    for g in range(0, len(rewards), G):
        group = [r for r in rewards[g : g + G] if r is not None]
        mean = sum(group) / len(group) if group else 0.0
        std = statistics.stdev(group) if len(group) >= 2 else 0.0
        for r in rewards[g : g + G]:
            if r is None:
                out.append(0.0)
            elif scale == "group":
                out.append((r - mean) / (std + 1e-4))
            elif scale == "batch":
                out.append((r - mean) / (batch_std + 1e-4))
            else:
                out.append(r - mean)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_reference(scale):
    rewards = torch.tensor([math.nan if r is None else r for r in REWARDS])
    got = group_advantages(rewards, num_generations=4, scale_rewards=scale)
    assert got.tolist() == pytest.approx(reference_advantages(REWARDS, 4, scale), rel=1e-5, abs=1e-6)


def test_group_advantages_without_none_equal_trl_formula():
    r = torch.tensor([0.1, 0.9, 0.4, 0.4, 1.0, 0.0])
    grouped = r.view(-1, 3)
    trl = (r - grouped.mean(1).repeat_interleave(3)) / (grouped.std(1).repeat_interleave(3) + 1e-4)
    torch.testing.assert_close(group_advantages(r, 3, "group"), trl)


def test_group_advantages_rejects_bad_settings():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "std")
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(5), 2, "group")


# ----------------------------------------------------------------------------------------------- loss


# grpo_loss's family settings at the classic GRPO values (TRL's defaults): token-level ratios, no delta, k3 KL
CLASSIC = dict(delta=None, importance_sampling_level="token", kl_estimator="k3", sapo_temperature_pos=1.0,
               sapo_temperature_neg=1.05)


def loss_inputs():
    g = torch.Generator().manual_seed(3)
    B, K = 4, 6
    logps = -torch.rand(B, K, generator=g) * 3
    old = logps + (torch.rand(B, K, generator=g) - 0.5) * 1.2  # ratios from ~0.55 to ~1.8: both clip sides
    ref = logps + (torch.rand(B, K, generator=g) - 0.5) * 0.8
    adv = torch.tensor([1.3, -0.8, 0.5, -1.6])
    mask = torch.zeros(B, K)
    for b, n in enumerate([6, 3, 1, 4]):
        mask[b, :n] = 1
    return logps, old, ref, adv, mask


def reference_loss(logps, old, ref, adv, mask, *, eps, eps_high, beta, loss_type, max_len):
    B, K = len(logps), len(logps[0])
    per_seq, total, n_tok, low, high, kls = [], 0.0, 0, 0, 0, 0.0
    for b in range(B):
        seq_sum, seq_n = 0.0, 0
        for t in range(K):
            if mask[b][t] == 0:
                continue
            r = math.exp(logps[b][t] - old[b][t])
            rc = min(max(r, 1 - eps), 1 + eps_high)
            loss = -min(r * adv[b], rc * adv[b])
            d = ref[b][t] - logps[b][t]
            kl = math.exp(d) - d - 1
            loss += beta * kl
            low += r < 1 - eps and adv[b] < 0
            high += r > 1 + eps_high and adv[b] > 0
            kls += kl
            seq_sum += loss
            seq_n += 1
        per_seq.append(seq_sum / seq_n)
        total += seq_sum
        n_tok += seq_n
    value = {"grpo": sum(per_seq) / B, "bnpo": total / n_tok, "dapo": total / n_tok,
             "dr_grpo": total / (B * max_len)}[loss_type]
    return value, {"clip_ratio/low_mean": low / n_tok, "clip_ratio/high_mean": high / n_tok,
                   "clip_ratio/region_mean": (low + high) / n_tok, "kl": kls / n_tok}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_matches_reference(loss_type):
    logps, old, ref, adv, mask = loss_inputs()
    kw = dict(epsilon=0.2, epsilon_high=0.28, beta=0.04, loss_type=loss_type, max_completion_length=8, **CLASSIC)
    loss, metrics = grpo_loss(logps, old, ref, adv, mask, **kw)
    want, want_metrics = reference_loss(logps.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                                        eps=0.2, eps_high=0.28, beta=0.04, loss_type=loss_type, max_len=8)
    assert want_metrics["clip_ratio/low_mean"] > 0 and want_metrics["clip_ratio/high_mean"] > 0  # both sides hit
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert metrics == pytest.approx(want_metrics, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loss_split_into_micro_batches_sums_to_whole(loss_type):
    """GRPOModule's accumulation: dapo normalises by the step's tokens, the others are scaled by rows / B."""
    logps, old, ref, adv, mask = loss_inputs()
    kw = dict(epsilon=0.2, epsilon_high=0.28, beta=0.04, loss_type=loss_type, max_completion_length=8, **CLASSIC)
    whole, _ = grpo_loss(logps, old, ref, adv, mask, **kw)
    parts = 0.0
    for rows in (slice(0, 3), slice(3, 4)):
        part, _ = grpo_loss(logps[rows], old[rows], ref[rows], adv[rows], mask[rows],
                            num_items_in_batch=mask.sum(), **kw)
        parts += part if loss_type == "dapo" else part * (rows.stop - rows.start) / 4
    assert parts.item() == pytest.approx(whole.item(), rel=1e-5, abs=1e-6)  # terms ~1 cancel to ~3e-3


def test_grpo_loss_without_beta_ignores_ref_and_symmetric_default():
    logps, old, ref, adv, mask = loss_inputs()
    kw = dict(beta=0.0, loss_type="bnpo", max_completion_length=8, **CLASSIC)
    a, metrics = grpo_loss(logps, old, None, adv, mask, epsilon=0.2, epsilon_high=None, **kw)
    b, _ = grpo_loss(logps, old, ref, adv, mask, epsilon=0.2, epsilon_high=0.2, **kw)
    want, _ = reference_loss(logps.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                             eps=0.2, eps_high=0.2, beta=0.0, loss_type="bnpo", max_len=8)
    assert a.item() == b.item() == pytest.approx(want, rel=1e-5)
    assert "kl" not in metrics


# ----------------------------------------------------------------------------------------------- the GRPO family


def plain_rewards(rewards):
    return torch.tensor([math.nan if r is None else r for r in rewards])


def test_rloo_advantages_leave_one_out():
    """R_i - mean of the other valid rewards of its group; Nones and single-valid groups give 0."""
    got = compute_advantages(plain_rewards(REWARDS), 4, "rloo", "group").tolist()
    want = []
    for g in range(0, len(REWARDS), 4):
        group = REWARDS[g:g + 4]
        valid = [r for r in group if r is not None]
        for i, r in enumerate(group):
            if r is None or len(valid) < 2:
                want.append(0.0)
                continue
            others = [x for j, x in enumerate(group) if j != i and x is not None]
            want.append(r - sum(others) / len(others))
    assert got == pytest.approx(want, abs=1e-6)
    # = G/(G-1) (R - mean) on a full group (verl's form)
    r = torch.tensor([0.1, 0.9, 0.4, 0.6])
    torch.testing.assert_close(compute_advantages(r, 4, "rloo", "group"), (r - r.mean()) * 4 / 3)


def test_reinforce_pp_advantages_whiten_over_tokens():
    """R - group mean, then (x - token mean) / sqrt(unbiased token var + 1e-8) over the completion tokens."""
    lengths = torch.tensor([3, 5, 2, 4, 1, 1, 6, 2, 4, 4, 4, 4, 7, 3, 3, 3, 2, 9, 1, 5])
    got = compute_advantages(plain_rewards(REWARDS), 4, "reinforce_pp", "group", lengths=lengths).tolist()
    centred, weights = [], []
    for g in range(0, len(REWARDS), 4):
        group = REWARDS[g:g + 4]
        valid = [r for r in group if r is not None]
        mean = sum(valid) / len(valid) if valid else 0.0
        for i, r in enumerate(group):
            centred.append(0.0 if r is None else r - mean)
            weights.append(0 if r is None else int(lengths[g + i]))
    tokens = [c for c, w in zip(centred, weights) for _ in range(w)]  # the advantage broadcast to its tokens
    mean, var = statistics.mean(tokens), statistics.variance(tokens)  # variance: unbiased, as verl's masked_var
    want = [0.0 if r is None else (c - mean) / math.sqrt(var + 1e-8) for r, c in zip(REWARDS, centred)]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="advantage_estimator='ppo'"):
        compute_advantages(plain_rewards(REWARDS), 4, "ppo", "group")


def test_informative_groups_and_overlong_penalty():
    assert informative_groups(plain_rewards(REWARDS), 4).tolist() == [True, False, True, False, True]
    lengths = torch.tensor([10, 12, 13, 16, 20])
    # DAPO: max 16, buffer 4 -> free up to 12 tokens, then -(L - 12) / 4 * factor
    assert overlong_penalty(lengths, 16, 4, 0.5).tolist() == pytest.approx([0, 0, -0.125, -0.5, -1.0])
    assert overlong_penalty(lengths, 16, 0, 0.5).tolist() == [0, 0, 0, 0, 0]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators(estimator):
    logp, ref = torch.tensor([-1.0, -0.2, -3.0]), torch.tensor([-1.5, -0.1, -2.0])
    want = [{"k1": lp - r, "k2": 0.5 * (r - lp) ** 2, "k3": math.exp(r - lp) - (r - lp) - 1}[estimator]
            for lp, r in zip(logp.tolist(), ref.tolist())]
    assert kl_per_token(logp, ref, estimator).tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)  # float32


def test_high_entropy_mask_keeps_the_top_quantile():
    entropy = torch.tensor([[0.1, 2.0, 0.5, 9.0], [3.0, 0.2, 7.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    values = sorted(x for x, m in zip(entropy.flatten().tolist(), mask.flatten().tolist()) if m)
    pos = 0.5 * (len(values) - 1)  # the 0.5 quantile, linear interpolation (numpy / torch's default)
    threshold = values[int(pos)] + (pos - int(pos)) * (values[min(int(pos) + 1, len(values) - 1)] - values[int(pos)])
    want = [[bool(m) and x >= threshold for x, m in zip(er, mr)] for er, mr in zip(entropy.tolist(), mask.tolist())]
    assert high_entropy_mask(entropy, mask, 0.5).tolist() == want
    assert high_entropy_mask(entropy, mask, 1.0).tolist() == mask.bool().tolist()


def reference_family_loss(logps, old, ref, adv, mask, *, eps, eps_high, beta, loss_type, level, delta, kl_est,
                          tau_pos, tau_neg, emask):
    """TRL's _compute_loss in plain Python (token loops), aggregation as reference_loss."""
    B, K = len(logps), len(logps[0])
    seq_logw = []
    for b in range(B):
        idx = [t for t in range(K) if mask[b][t]]
        seq_logw.append(sum(logps[b][t] - old[b][t] for t in idx) / max(len(idx), 1))
    per_seq, total, n_tok = [], 0.0, 0
    for b in range(B):
        seq_sum, seq_n = 0.0, 0
        for t in range(K):
            if not mask[b][t]:
                continue
            w = math.exp(logps[b][t] - old[b][t] if level == "token" else seq_logw[b])
            a = adv[b]
            if loss_type == "cispo":
                loss = -min(w, eps_high) * a * logps[b][t]
            elif loss_type == "sapo":
                tau = tau_pos if a > 0 else tau_neg
                loss = -(1 / (1 + math.exp(-tau * (w - 1)))) * 4 / tau * a
            else:
                wc = min(max(w, 1 - eps), 1 + eps_high)
                w1 = min(w, delta) if delta is not None else w
                loss = -min(w1 * a, wc * a)
            if emask is not None and not emask[b][t]:
                loss = 0.0
            x = ref[b][t] - logps[b][t]
            loss += beta * {"k1": -x, "k2": 0.5 * x * x, "k3": math.exp(x) - x - 1}[kl_est]
            seq_sum += loss
            seq_n += 1
        per_seq.append(seq_sum / seq_n)
        total += seq_sum
        n_tok += seq_n
    return sum(per_seq) / B if loss_type in ("grpo", "sapo") else total / n_tok


@pytest.mark.parametrize("loss_type,level,delta,kl_est", [
    ("dapo", "token", 1.5, "k3"), ("grpo", "sequence", None, "k1"), ("bnpo", "sequence", 1.4, "k2"),
    ("cispo", "token", None, "k3"), ("cispo", "sequence", None, "k2"), ("sapo", "token", None, "k3"),
    ("sapo", "sequence", None, "k1"),
])
@pytest.mark.parametrize("entropy_masked", [False, True])
def test_grpo_family_loss_matches_reference(loss_type, level, delta, kl_est, entropy_masked):
    logps, old, ref, adv, mask = loss_inputs()
    emask = (torch.arange(24).view(4, 6) % 3 != 0) if entropy_masked else None
    eps_high = 1.3 if loss_type == "cispo" else 0.28  # cispo's cap on w: some tokens exceed it
    kw = dict(epsilon=0.2, epsilon_high=eps_high, beta=0.04, loss_type=loss_type, max_completion_length=8, delta=delta,
              importance_sampling_level=level, kl_estimator=kl_est, sapo_temperature_pos=1.0,
              sapo_temperature_neg=1.05, entropy_mask=emask)
    loss, metrics = grpo_loss(logps, old, ref, adv, mask, **kw)
    want = reference_family_loss(logps.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), eps=0.2,
                                 eps_high=eps_high, beta=0.04, loss_type=loss_type, level=level, delta=delta,
                                 kl_est=kl_est, tau_pos=1.0, tau_neg=1.05,
                                 emask=None if emask is None else emask.tolist())
    assert loss.item() == pytest.approx(want, rel=1e-5)
    if loss_type == "cispo":
        assert 0 < metrics["cispo_clip_ratio"] < 1


def test_grpo_family_gradients():
    """cispo's weight is detached: d loss / d logp = -clip(w) A / N per token; sapo's gate at w = 1 has slope 1,
    so at the sampling policy its gradient is the plain policy gradient's."""
    logps, old, ref, adv, mask = loss_inputs()
    lp = logps.clone().requires_grad_(True)
    loss, _ = grpo_loss(lp, old, None, adv, mask, epsilon=0.2, epsilon_high=1.3, beta=0.0, loss_type="cispo",
                        max_completion_length=8, **CLASSIC)
    loss.backward()
    w = torch.exp(logps - old).clamp(max=1.3)
    torch.testing.assert_close(lp.grad, -(w * adv[:, None]) * mask / mask.sum())
    lp = logps.clone().requires_grad_(True)
    loss, _ = grpo_loss(lp, logps, None, adv, mask, epsilon=0.2, epsilon_high=0.28, beta=0.0, loss_type="sapo",
                        max_completion_length=8, **CLASSIC)
    loss.backward()
    plain = logps.clone().requires_grad_(True)
    ref_loss, _ = grpo_loss(plain, logps, None, adv, mask, epsilon=0.2, epsilon_high=0.28, beta=0.0,
                            loss_type="grpo", max_completion_length=8, **CLASSIC)
    ref_loss.backward()
    torch.testing.assert_close(lp.grad, plain.grad)


# ----------------------------------------------------------------------------------------------- log-probs


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def left_padded_batch(tok):
    texts = ["a short one", "a noticeably longer prompt with more words in it"]
    return tok(texts, return_tensors="pt", padding=True, padding_side="left")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_logprobs_equal_full_log_softmax(model_and_tok, temperature):
    model, tok = model_and_tok
    enc = left_padded_batch(tok)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    K = 4
    got = selective_logprobs(model, ids, mask, K, temperature=temperature)
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    full = torch.log_softmax(logits[:, -K - 1 : -1].float() / temperature, dim=-1)
    torch.testing.assert_close(got, full.gather(-1, ids[:, -K:, None]).squeeze(-1))
    # The padded short row must score its tokens as the unpadded sequence does (positions follow the mask).
    alone = tok(["a short one"], return_tensors="pt")  # 3 tokens: score the last 2
    torch.testing.assert_close(got[0, -2:], selective_logprobs(model, alone["input_ids"], alone["attention_mask"], 2,
                                                               temperature=temperature)[0], rtol=1e-4, atol=1e-5)


def test_logprobs_and_entropy_from_bf16_logits():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 50, generator=g) * 4).bfloat16()
    ids = torch.randint(0, 50, (3, 5), generator=g)
    lp = torch.log_softmax(logits.float() / 1.3, -1)
    torch.testing.assert_close(logprobs_from_logits(logits, ids, 1.3), lp.gather(-1, ids[..., None]).squeeze(-1))
    torch.testing.assert_close(entropy_from_logits(logits, 1.3), -(lp.exp() * lp).sum(-1))


def test_logprobs_match_the_sampling_distribution_of_generate(model_and_tok):
    """What we train on is what generate() sampled from: same temperature, same positions under left padding."""
    model, tok = model_and_tok
    enc = left_padded_batch(tok)
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=6,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    completion = out.sequences[:, enc["input_ids"].size(1) :]
    cmask = completion_mask_from_ids(completion, [tok.eos_token_id])
    sampled = torch.stack([torch.log_softmax(step.float() / 0.7, -1) for step in out.logits], 1)
    want = sampled.gather(-1, completion[..., None]).squeeze(-1)
    attn = torch.cat([enc["attention_mask"], cmask], 1)
    got = selective_logprobs(model, out.sequences, attn, completion.size(1), temperature=0.7)
    torch.testing.assert_close(got * cmask, want * cmask, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir):
    """The tiny model with 6x its (tied) embedding: the random init is near uniform over 49k tokens (entropy
    ~10.78 everywhere); this one's entropies range from ~4 to ~9, so a wrong position or temperature shows."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(6.0)
    return model


def completion_batch(tok):
    """[left-padded prompt | 5 completion tokens], attention mask, completion mask (row 0 ends after 3 tokens)."""
    enc = left_padded_batch(tok)
    completion = torch.randint(0, len(tok), (2, 5), generator=torch.Generator().manual_seed(4))
    cmask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return torch.cat([enc["input_ids"], completion], 1), torch.cat([enc["attention_mask"], cmask], 1), cmask


def test_chunked_logprobs_equal_plain(sharp_model, model_and_tok):
    model, tok = sharp_model, model_and_tok[1]
    ids, attn, _ = completion_batch(tok)
    plain = selective_logprobs(model, ids, attn, 5, temperature=0.7)
    chunked = selective_logprobs(model, ids, attn, 5, temperature=0.7, impl="chunked")
    assert chunked.dtype == torch.float32 and chunked.shape == (2, 5)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="logprob_impl"):
        selective_logprobs(model, ids, attn, 5, temperature=0.7, impl="fused")


def test_chunked_logprobs_refuse_a_head_that_transforms_its_logits(model_and_tok, monkeypatch):
    model, tok = model_and_tok
    ids, attn, _ = completion_batch(tok)
    monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        selective_logprobs(model, ids, attn, 5, temperature=0.7, impl="chunked")


def test_chunked_entropy_equals_plain(sharp_model, model_and_tok):
    model, tok = sharp_model, model_and_tok[1]
    ids, attn, _ = completion_batch(tok)
    _, plain = logprobs_and_entropy(model, ids, attn, 5, temperature=0.7, impl="plain")
    assert plain.std() > 1.0
    _, chunked = logprobs_and_entropy(model, ids, attn, 5, temperature=0.7, impl="chunked")
    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    # Chunks of 3 of the 10 tokens: a partial last chunk, and chunks that straddle the two rows.
    hidden = completion_hidden(model, ids, attn, 5)
    weight = model.get_output_embeddings().weight
    torch.testing.assert_close(entropy_from_hidden(hidden, weight, None, 0.7, chunk_size=3), plain,
                               rtol=1e-5, atol=1e-6)


def perturbed_copy(model_dir, scale=0.02):
    """The model with Gaussian noise on every weight: a reference that differs from the policy."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval().requires_grad_(False)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_chunked_logprobs_give_the_plain_loss_gradients(sharp_model, model_and_tok, tiny_model_dir, beta):
    model, tok = sharp_model, model_and_tok[1]
    ref_model = perturbed_copy(tiny_model_dir) if beta else None
    ids, attn, cmask = completion_batch(tok)
    params = list(model.parameters())
    old = (selective_logprobs(model, ids, attn, 5, temperature=0.7).detach()
           + (torch.rand(2, 5, generator=torch.Generator().manual_seed(6)) - 0.5) * 1.2)  # ratios on both clip sides
    adv = torch.tensor([1.3, -0.8])

    def loss_metrics_grads(impl):
        logps = selective_logprobs(model, ids, attn, 5, temperature=0.7, impl=impl)
        ref = None
        if beta:
            with torch.no_grad():
                ref = selective_logprobs(ref_model, ids, attn, 5, temperature=0.7, impl=impl)
        loss, metrics = grpo_loss(logps, old, ref, adv, cmask, epsilon=0.2, epsilon_high=0.28, beta=beta,
                                  loss_type="dapo", max_completion_length=5, **CLASSIC)
        return loss, metrics, torch.autograd.grad(loss, params)

    plain_loss, plain_metrics, plain_grads = loss_metrics_grads("plain")
    loss, metrics, grads = loss_metrics_grads("chunked")
    if beta:
        assert plain_metrics["kl"] > 1e-3  # the reference differs: its term has a gradient
    assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    assert metrics == pytest.approx(plain_metrics, rel=1e-5, abs=1e-7)
    assert all(g.abs().sum() > 0 for g in plain_grads)
    for (name, _), got, want in zip(model.named_parameters(), grads, plain_grads):
        # atol: a sum over tokens reduces in another order on more threads (measured: 1 of 3.1M entries off by 2e-6)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_completion_mask_stops_after_first_end_token():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert completion_mask_from_ids(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


# ----------------------------------------------------------------------------------------------- training

ITEMS = [{"id": f"q{i}", "domain": "arith", "question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(5)]


def build_messages(item):
    return [{"role": "user", "content": item["question"]}]


class ToyReward:
    """Deterministic: the fraction of vowels in the completion text; one completion in 8 returns None."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, **columns):
        self.calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns))
        rewards = [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]
        return [None if i % 8 == 7 else r for i, r in enumerate(rewards)]


# Every RLConfig field, set for tests; tests change what they test.
DPO = dict(steps=2, batch_size=2, lr=1e-6, beta=0.1, loss_type="sigmoid", pairs_from="teacher", num_samples=4,
           max_pairs=8, max_new_tokens=8, temperature=1.0, precision="32-true", save_dtype="float32")
SASR = dict(warmup_steps=1, steps=2, gamma=1.0, sft_lr=1e-5, sft_batch_size=2, max_length=128)
GRPO = dict(enabled=True, stages=["grpo"], steps=2, prompts_per_step=2, num_generations=4, num_iterations=1, lr=1e-3,
            beta=0.04, kl_estimator="k3", epsilon=0.2, epsilon_high=0.28, delta=None, importance_sampling_level="token",
            loss_type="dapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, advantage_estimator="grpo",
            scale_rewards="group", mask_truncated_completions=False, top_entropy_quantile=1.0, dynamic_sampling=False,
            max_sampling_tries=4, overlong_buffer_len=0, overlong_penalty_factor=1.0, rewards=["correctness"],
            reward_weights=None, max_new_tokens=8, temperature=1.0, top_p=0.95, weight_decay=0.0,
            precision="32-true", save_dtype="float32", logprob_impl="plain", shared_prefix=False, dpo=DPO, sasr=SASR)


def grpo(model_dir, reward, out, micro_batch_size=None, logger=None, **changes):
    return train_grpo(RLConfig(**(GRPO | changes)), model_dir, ITEMS, reward, build_messages, out, seed=0,
                      logger=logger, progress=False, micro_batch_size=micro_batch_size)


def test_train_grpo_two_steps_writes_loadable_folder(tiny_model_dir, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    reward = ToyReward()
    logger = CSVLogger(tmp_path / "logs", name="grpo")
    out = grpo(tiny_model_dir, reward, tmp_path / "rl", logger=logger, micro_batch_size=3)
    assert out["steps"] == 2 and len(reward.calls) == 2
    for call, step in zip(reward.calls, out["history"]):
        assert len(call["completions"]) == len(call["prompts"]) == len(call["completion_ids"]) == 8
        assert all(call["id"][i] == call["id"][i // 4 * 4] for i in range(8))  # grouped by prompt
        assert all(call["prompts"][i] == build_messages({"question": q}) for i, q in enumerate(call["question"]))
        rewards = ToyReward()(**call)
        assert step["reward"] == pytest.approx(statistics.mean(r for r in rewards if r is not None), rel=1e-5)
        assert step["completions/mean_length"] == pytest.approx(statistics.mean(map(len, call["completion_ids"])))
        assert step["kl"] >= 0.0 and math.isfinite(step["loss"])
    assert out["history"][0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update

    model, tok = AutoModelForCausalLM.from_pretrained(tmp_path / "rl"), AutoTokenizer.from_pretrained(tmp_path / "rl")
    ids = tok("What is 1 + 1?", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()
    before, after = load_file(f"{tiny_model_dir}/model.safetensors"), load_file(f"{tmp_path}/rl/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    header = open(f"{logger.log_dir}/metrics.csv").readline().strip().split(",")
    for name in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                 "completions/clipped_ratio", "clip_ratio/region_mean", "kl", "entropy", "loss"):
        assert f"train/{name}" in header


def test_train_grpo_is_deterministic_for_a_seed(tiny_model_dir, tmp_path):
    settings = dict(beta=0.0, loss_type="grpo", scale_rewards="none", steps=1)
    a = grpo(tiny_model_dir, ToyReward(), tmp_path / "a", **settings)
    b = grpo(tiny_model_dir, ToyReward(), tmp_path / "b", **settings)
    assert a["history"][0]["reward"] == b["history"][0]["reward"]
    wa, wb = load_file(f"{tmp_path}/a/model.safetensors"), load_file(f"{tmp_path}/b/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_grpo_chunked_logprobs_train_like_plain(tiny_model_dir, tmp_path):
    # Same seed, so the same completions; the chunked log-probs give the plain step's loss, kl, entropy and
    # weights up to float rounding (beta != 0: the reference's log-probs are chunked too).
    runs = {impl: grpo(tiny_model_dir, ToyReward(), tmp_path / impl, micro_batch_size=3, temperature=0.7,
                       logprob_impl=impl)
            for impl in ("plain", "chunked")}
    for plain, chunked in zip(runs["plain"]["history"], runs["chunked"]["history"], strict=True):
        assert chunked["reward"] == plain["reward"]
        for key in ("loss", "kl", "entropy", "clip_ratio/region_mean"):
            assert chunked[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key
    before = load_file(f"{tiny_model_dir}/model.safetensors")
    plain, chunked = (load_file(f"{tmp_path}/{impl}/model.safetensors") for impl in ("plain", "chunked"))
    assert any(not torch.equal(before[k], plain[k]) for k in before)
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], atol=1e-5, rtol=0, msg=name)


def test_train_grpo_shared_prefix_changes_compute_not_results(tiny_model_dir, tmp_path):
    # Each prompt read once for its completions (and the reference's too, beta != 0): the same losses, kl,
    # entropy and weights as reading every row whole, up to float rounding.
    runs = {shared: grpo(tiny_model_dir, ToyReward(), tmp_path / str(shared), temperature=0.7,
                         logprob_impl="chunked", shared_prefix=shared)
            for shared in (False, True)}
    for whole, shared in zip(runs[False]["history"], runs[True]["history"], strict=True):
        assert shared["reward"] == whole["reward"]
        for key in ("loss", "kl", "entropy", "clip_ratio/region_mean"):
            assert shared[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
    whole, shared = (load_file(f"{tmp_path}/{s}/model.safetensors") for s in (False, True))
    for name in whole:
        torch.testing.assert_close(shared[name], whole[name], atol=1e-5, rtol=0, msg=name)


def test_train_grpo_chunked_logprobs_run_under_bf16_autocast(tiny_model_dir, tmp_path):
    # The conf's setting (bf16-mixed, chunked): the kernel gets autocast's float32 hidden states and weight.
    # (Step 1's loss does not depend on the log-probs: the ratio is 1 and the policy is the reference.)
    plain, chunked = (grpo(tiny_model_dir, ToyReward(), tmp_path / impl, steps=1, temperature=0.7,
                           precision="bf16-mixed", logprob_impl=impl)["history"][0]
                      for impl in ("plain", "chunked"))
    assert chunked["reward"] == plain["reward"]
    assert chunked["entropy"] == pytest.approx(plain["entropy"], rel=1e-3)  # both from bf16 logits


def test_a_diverging_grpo_run_raises_before_saving(tiny_model_dir, tmp_path):
    from branchmerge.models.training import DivergedError

    with pytest.raises(DivergedError, match=r"at optimizer step \d"):
        grpo(tiny_model_dir, ToyReward(), tmp_path / "rl", lr=1e9, beta=0.0, steps=3)
    assert not (tmp_path / "rl").exists()


def test_num_iterations_reuse_the_batch_with_ratios_to_the_sampling_policy(tiny_model_dir, tmp_path):
    """mu = 2: two optimizer steps per generation batch; the second one's ratios are to the sampling policy's
    log-probs (taken once, before the first step), so they leave 1 and clipping acts; with mu = 1 it never does."""
    one = grpo(tiny_model_dir, ToyReward(), tmp_path / "one", steps=1, beta=0.0, lr=3e-2, epsilon_high=0.2)
    two = grpo(tiny_model_dir, ToyReward(), tmp_path / "two", steps=1, beta=0.0, lr=3e-2, epsilon_high=0.2,
               num_iterations=2)
    assert one["history"][0]["clip_ratio/region_mean"] == 0.0
    assert two["history"][0]["clip_ratio/region_mean"] > 0.0
    assert two["history"][0]["reward"] == one["history"][0]["reward"]  # the same rollouts


def test_dynamic_sampling_never_trains_on_a_zero_variance_group(tiny_model_dir, tmp_path, monkeypatch):
    """Prompts q0, q2, q4 always score 1.0 (no signal); dynamic sampling drops their groups and draws more
    prompts until the step holds prompts_per_step informative groups."""
    import branchmerge.models.training.grpo as grpo_module

    seen = []
    original = grpo_module.compute_advantages

    def recorded(rewards, G, *args, **kwargs):
        seen.append(rewards.clone())
        return original(rewards, G, *args, **kwargs)

    monkeypatch.setattr(grpo_module, "compute_advantages", recorded)

    def reward(prompts, completions, completion_ids, id, **columns):
        return [1.0 if int(i[1:]) % 2 == 0 else sum(ch in "aeiou" for ch in c) / max(len(c), 1) + len(c) / 100
                for i, c in zip(id, completions)]

    out = grpo(tiny_model_dir, reward, tmp_path / "ds", steps=3, beta=0.0, dynamic_sampling=True,
               max_sampling_tries=6)
    assert len(seen) == 3
    for rewards in seen:
        assert len(rewards) == 2 * 4 and informative_groups(rewards, 4).all()
    assert sum(h["sampling/groups_dropped"] for h in out["history"]) > 0
    assert all(h["sampling/groups_kept"] == 2 for h in out["history"])


def test_mask_truncated_completions_leaves_them_out_of_the_loss(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = RLConfig(**(GRPO | {"mask_truncated_completions": True, "num_generations": 2}))
    module = GRPOModule(model, tok, ToyReward(), build_messages, cfg, ref_model=None if cfg.beta == 0 else model,
                        seed=0)
    stop = module.stop_ids[0]
    batch = module.collate([[]], [[5, 6]], [[[7, 8, stop], [7, 8, 9, 10]]])  # the second hit max_new_tokens
    assert batch["completion_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[1, 1, 1, 0], [0, 0, 0, 0]]
    assert batch["truncated"].tolist() == [False, True]
