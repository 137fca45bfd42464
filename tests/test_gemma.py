"""Gemma 2 / Gemma 3 (text) and sliding-window attention against transformers (issue 20, item 5).

Tiny random models built with transformers (float32, eager attention), windows of 4 slots on
prompts of 10, so every sliding layer hides keys: logits parity (max |difference| < 1e-4 on real
tokens) of the full forward, greedy decode equal to transformers' generate through our KV cache
across the window, and save_hf output loaded by transformers giving the same logits.
Helpers come from tests/test_hf.py.
"""
import numpy as np
import pytest

from xpo_jax.models import Transformer
from xpo_jax.models.hf import config_from_hf, load_hf, save_hf
from xpo_jax.models.transformer import LinearRopeScaling
from xpo_jax.sampling import sample

from test_hf import _assert_close_on_mask, _batch, _hf_model, _hf_out, _our_logits, hf  # noqa: F401

WINDOW = 4
TINY = dict(head_dim=8, sliding_window=WINDOW)


def _gemma2(hf):
    # Alternating local/global layers; both soft-caps small enough to bite on random weights.
    return _hf_model(hf, "Gemma2ForCausalLM", num_hidden_layers=4, query_pre_attn_scalar=12,
                     attn_logit_softcapping=3.0, final_logit_softcapping=5.0, **TINY)


def _gemma3(hf):
    # Mixed layer kinds, local RoPE base, linear scaling on the global layers, final soft-cap.
    rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    return _hf_model(hf, "Gemma3ForCausalLM", "Gemma3TextConfig", num_hidden_layers=3,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                     rope_parameters=rope, query_pre_attn_scalar=12, final_logit_softcapping=5.0,
                     **TINY)


def _mistral(hf):
    return _hf_model(hf, "MistralForCausalLM", **TINY)


MODELS = {"gemma2": _gemma2, "gemma3": _gemma3, "mistral": _mistral}


@pytest.fixture(scope="module", params=sorted(MODELS))
def checkpoint(request, hf, tmp_path_factory):
    """(name, transformers model, its saved directory)."""
    model = MODELS[request.param](hf)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def test_config_options(checkpoint):
    name, _, path = checkpoint
    config, _, kind = load_hf(path)
    assert kind == "causal_lm" and config.sliding_window == WINDOW
    if name == "mistral":
        assert config.sliding_layers() == (True, True) and not config.embed_scale
        return
    assert (config.hidden_act, config.norm_plus_one, config.embed_scale, config.sandwich_norms) == (
        "gelu_tanh", True, True, True)
    assert config.query_pre_attn_scalar == 12 and config.final_softcap == 5.0 and config.tie_embeddings
    if name == "gemma2":
        assert config.sliding_layers() == (True, False, True, False) and config.attn_softcap == 3.0
    else:
        assert config.sliding_layers() == (True, False, True) and config.qk_norm
        assert (config.rope_theta, config.rope_local_theta, config.rope_scaling) == (
            1e6, 1e4, LinearRopeScaling(2.0))


@pytest.mark.parametrize("scan", [False, True])
def test_logits_parity_past_the_window(hf, checkpoint, scan):
    # Rows of 10, 7 and 4 real tokens (left and right padding), window 4.
    _, model, path = checkpoint
    config, params, _ = load_hf(path, overrides={"scan_layers": scan})
    tokens, mask = _batch(config.vocab_size, seed=4)
    _assert_close_on_mask(_our_logits(config, params, tokens, mask), _hf_out(hf, model, tokens, mask), mask)


def test_window_is_masking_not_a_length_cap(checkpoint):
    """The window hides far keys (else this test could not tell a window from none): dropping it
    changes the logits of the last token of a prompt longer than the window."""
    import dataclasses
    _, _, path = checkpoint
    config, params, _ = load_hf(path)
    assert config.max_seq_len > WINDOW
    tokens, mask = _batch(config.vocab_size, seed=5)
    full = dataclasses.replace(config, sliding_window=None, layer_types=())
    diff = np.abs(_our_logits(config, params, tokens, mask) - _our_logits(full, params, tokens, mask))
    assert diff[0, -1].max() > 1e-3


def test_greedy_decode_equals_generate(hf, checkpoint):
    """Prompts of 7 slots (> window) left-padded, 6 new tokens through the KV cache."""
    torch, _ = hf
    _, model, path = checkpoint
    config, params, _ = load_hf(path)
    tokens, mask = _batch(config.vocab_size, seed=6)
    tokens, mask = tokens[:, 3:], mask[:, 3:]  # [3, 7]: rows of 7, 7 and 4 real tokens
    mask[2] = [0, 0, 0, 1, 1, 1, 1]
    tokens = np.where(mask == 1, np.maximum(tokens, 2), 0).astype(np.int32)
    n = 6
    ours = sample(Transformer(config).apply, params, tokens, mask, np.zeros(2, np.uint32),
                  max_new_tokens=n, temperature=0.0, eos_id=1, pad_id=0, min_new_tokens=n)
    theirs = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                            attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, eos_token_id=1, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(ours.tokens), theirs[:, tokens.shape[1]:].numpy())


def test_save_hf_loads_in_transformers(hf, checkpoint, tmp_path):
    _, transformers = hf
    name, model, path = checkpoint
    config, params, _ = load_hf(path)
    save_hf(tmp_path, config, params)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(theirs).__name__ == type(model).__name__
    assert load_hf(tmp_path)[0] == config
    tokens, mask = _batch(config.vocab_size, seed=7)
    _assert_close_on_mask(_our_logits(config, params, tokens, mask), _hf_out(hf, theirs, tokens, mask), mask)


def test_gemma_config_dialects_and_errors():
    """transformers 4.x Gemma 3 keys (rope_local_base_freq, sliding_window_pattern) read as 5.x's."""
    base = dict(architectures=["Gemma3ForCausalLM"], vocab_size=97, hidden_size=32, intermediate_size=64,
                num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    v4 = config_from_hf({**base, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 3,
                         "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert v4.sliding_layers() == (True, True, False, True, True, False)
    assert (v4.rope_theta, v4.rope_local_theta, v4.rope_scaling) == (1e6, 1e4, LinearRopeScaling(8.0))
    assert v4.query_pre_attn_scalar == 256 and v4.sliding_window == 4096 and v4.attn_softcap is None
    with pytest.raises(NotImplementedError, match="use_bidirectional_attention"):
        config_from_hf({**base, "use_bidirectional_attention": True})
    with pytest.raises(NotImplementedError, match="hidden_activation"):
        config_from_hf({**base, "hidden_activation": "relu"})
    with pytest.raises(ValueError, match="unsupported architecture 'Gemma3ForConditionalGeneration'"):
        config_from_hf({**base, "architectures": ["Gemma3ForConditionalGeneration"]})


def test_gemma2_reward_model_parity(hf, tmp_path):
    """Gemma2ForSequenceClassification: the same trunk, score at the last real token."""
    from test_hf import PAD, _our_rewards
    model = _hf_model(hf, "Gemma2ForSequenceClassification", num_labels=1, pad_token_id=PAD,
                      num_hidden_layers=2, query_pre_attn_scalar=12, **TINY)
    model.save_pretrained(tmp_path)
    config, params, kind = load_hf(tmp_path)
    assert kind == "reward_model" and config.sandwich_norms
    tokens, mask = _batch(config.vocab_size, seed=8)
    theirs = _hf_out(hf, model, tokens, mask)[:, 0]
    np.testing.assert_array_less(np.abs(_our_rewards(config, params, tokens, mask) - theirs).max(), 1e-4)
