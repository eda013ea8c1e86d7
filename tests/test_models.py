"""models.py: presets, config files, local directories, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_llm.models import PRESETS, build_config, build_model, count_parameters, has_weights


@pytest.mark.parametrize("name, low, high", [("tiny", 0.2e6, 1e6), ("llama-5m", 4e6, 7e6), ("llama-20m", 15e6, 30e6),
                                             ("llama-124m", 110e6, 135e6), ("llama-1b", 0.9e9, 1.3e9)])
def test_preset_sizes_on_meta_device(name, low, high):
    with torch.device("meta"):
        model = build_model(name)
    assert next(model.parameters()).device.type == "meta"  # nothing allocated: how sharded init starts
    assert low <= count_parameters(model) <= high


def test_count_parameters_counts_tied_weights_once():
    model = build_model("tiny", vocab_size=256)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    naive = sum(p.numel() for p in model.parameters())  # parameters() already deduplicates
    assert count_parameters(model) == naive


def test_overrides_and_unknown_fields():
    config = build_config("tiny", vocab_size=300, num_hidden_layers=3)
    assert (config.vocab_size, config.num_hidden_layers) == (300, 3)
    assert PRESETS["tiny"]["num_hidden_layers"] == 2  # the preset itself is untouched
    with pytest.raises(ValueError, match="unknown config field.*'n_lyr'"):
        build_config("tiny", n_lyr=3)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown model 'tinyy'.*tiny, llama-5m"):
        build_config("tinyy")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_config(str(tmp_path / "nope" / "config.json"))


def test_config_file_and_directories(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                                   "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 100}))
    model = build_model(str(tmp_path / "cfg.json"))
    assert model.config.hidden_size == 32 and not has_weights(str(tmp_path / "cfg.json"))

    trained = build_model("tiny", vocab_size=128)
    trained.save_pretrained(tmp_path / "with_weights")
    trained.config.save_pretrained(tmp_path / "config_only")
    assert has_weights(str(tmp_path / "with_weights")) and not has_weights(str(tmp_path / "config_only"))
    x = torch.randint(0, 128, (2, 9))
    loaded = build_model(str(tmp_path / "with_weights"))
    torch.testing.assert_close(loaded(x).logits, trained(x).logits, rtol=0, atol=1e-5)
    fresh = build_model(str(tmp_path / "config_only"))  # same shapes, new random weights
    assert fresh.config.vocab_size == 128
    assert not torch.allclose(fresh(x).logits, trained(x).logits)


def test_attn_implementation_does_not_mutate_the_preset():
    eager = build_model("tiny", attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    assert build_model("tiny").config._attn_implementation == "sdpa"
