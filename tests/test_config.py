import pytest

from couplet.core.config import Config, ConfigError, apply_overrides, config_from_dict, load_config, replace


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["train.max_steps=300", "train.device=cpu", "train.lr=1e-3", "data.sha256=null", "decode.tone=true"])
    assert cfg.train.max_steps == 300 and cfg.train.device == "cpu" and cfg.train.lr == 1e-3
    assert cfg.data.sha256 is None and cfg.decode.tone is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_stepz=3", "unknown config key train.max_stepz"),
        ("trian.max_steps=3", "unknown config section 'trian'"),
        ("train.max_steps=lots", "train.max_steps: expected an integer, got 'lots'"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("decode.tone=maybe", "decode.tone: expected true/false"),
        ("train.max_steps", "is not of the form section.key=value"),
        ("max_steps=3", "must be section.key"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(Config(), [override])


def test_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 5\nmodel:\n  embed_dim: 32\n")
    cfg = load_config(path, ["train.max_steps=7"])
    assert cfg.train.max_steps == 7 and cfg.model.embed_dim == 32
    path.write_text("train:\n  max_steps: [1]\n")
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        load_config(path)
    path.write_text("model:\n  embed_dims: 3\n")
    with pytest.raises(ConfigError, match="unknown config key model.embed_dims"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_section_hash_changes_with_values():
    a, b = Config(), apply_overrides(Config(), ["data.min_count=1"])
    assert a.section_hash("data") != b.section_hash("data")
    assert a.section_hash("train") == b.section_hash("train")


def test_sections_are_frozen_and_refuse_unknown_keys():
    import pydantic

    cfg = Config()
    with pytest.raises(pydantic.ValidationError):
        cfg.train.max_steps = 3
    with pytest.raises(ConfigError, match=r"^unknown config key decode.top_k \(known: constrained, tone, no_reuse, lm_weight, beam_size, phrase_uni, phrase_bi, phrase_tri, default_blocklist, blocklist, block_input\)$"):
        config_from_dict({"decode": {"top_k": 3}})


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"train": {"max_steps": True}}, "train.max_steps: expected an integer, got True"),
        ({"train": {"lr": True}}, "train.lr: expected a number, got True"),
        ({"data": {"source": ["a"]}}, "data.source: expected a string, got ['a']"),
        ({"train": 3}, "train: expected a mapping, got 3"),
    ],
)
def test_yaml_values_of_the_wrong_type_are_one_line_errors(raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert str(info.value) == message


def test_strings_stay_strings_and_numbers_become_strings_for_string_fields():
    assert apply_overrides(Config(), ["data.source=123"]).data.source == "123"
    assert config_from_dict({"data": {"source": 123}}).data.source == "123"
    assert apply_overrides(Config(), ["train.cpu_bf16=on"]).train.cpu_bf16 is True


def test_a_saved_config_from_an_older_version_still_loads():
    saved = Config().to_dict() | {"vocab_size": 40}
    saved["decode"] = {**saved["decode"], "top_k": 1}  # a field since removed
    cfg = config_from_dict(saved, drop_unknown=True)
    assert cfg == Config()
    with pytest.raises(ConfigError, match="unknown config key decode.top_k"):
        config_from_dict({"decode": saved["decode"]})


def test_replace_validates_like_an_override():
    cfg = replace(Config(), "train", max_steps=5)
    assert cfg.train.max_steps == 5 and Config().train.max_steps is None
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        replace(cfg, "train", max_steps="many")


def test_an_empty_or_null_value_clears_an_optional_field():
    cfg = apply_overrides(Config(), ["train.max_steps=300", "data.sha256=abc"])
    cleared = apply_overrides(cfg, ["train.max_steps=", "data.sha256=", "train.eval_every=None"])
    assert cleared.train.max_steps is None and cleared.data.sha256 is None and cleared.train.eval_every is None
    assert config_from_dict({"data": {"sha256": ""}}).data.sha256 is None
    with pytest.raises(ConfigError, match="train.epochs: expected an integer, got ''"):
        apply_overrides(Config(), ["train.epochs="])  # not optional: nothing to clear


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=[oops", "train.lr: expected a number, got '[oops'"),
        ("train.cpu_bf16=2", "train.cpu_bf16: expected auto or true/false, got 2"),
        ("train.max_steps=3.5", "train.max_steps: expected an integer, got 3.5"),
        ("data.source=null", "data.source: expected a string, got None"),
    ],
)
def test_override_errors_are_exactly_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), [override])
    assert str(info.value) == message


def test_replace_refuses_unknown_sections_and_keys():
    with pytest.raises(ConfigError, match="unknown config section 'trian'"):
        replace(Config(), "trian", max_steps=3)
    with pytest.raises(ConfigError, match=r"^unknown config key train.foo \(known: epochs, "):
        replace(Config(), "train", foo=1)


def test_cpu_bf16_is_auto_true_or_false():
    assert Config().train.cpu_bf16 == "auto"
    assert apply_overrides(Config(), ["train.cpu_bf16=true"]).train.cpu_bf16 is True
    assert apply_overrides(Config(), ["train.cpu_bf16=false"]).train.cpu_bf16 is False
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), ["train.cpu_bf16=maybe"])
    assert str(info.value) == "train.cpu_bf16: expected auto or true/false, got 'maybe'"


def test_configs_seed_yaml_is_the_seed_recipe_whatever_the_defaults():
    from pathlib import Path

    from couplet.core.config import load_config

    seed = load_config(Path(__file__).resolve().parents[1] / "configs" / "seed.yaml")
    m, t = seed.model, seed.train
    assert (m.kind, m.embed_dim, m.n_blocks, m.kernel_size, m.dropout) == ("gated_cnn", 128, 6, 3, 0.25)
    assert (t.batch_size, t.lr, t.lr_schedule, t.warmup_steps, t.ema_decay, t.max_len) == (64, 1e-3, "constant", 0, None, 16)
    assert (t.epochs, t.patience, t.max_minutes) == (10, 3, None) and seed.data.min_count == 2
    assert seed.decode.lm_weight == 0.0
    assert (m.directions, t.swapped_pairs) == (1, False)  # one direction, the dataset's pairs only
    assert m.output == "full"  # the seed's softmax over the whole vocabulary
    assert Config().model.output == "adaptive"  # the default since issue 20's runs


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.kind=lstm", r"^model\.kind: .*'gated_cnn', 'refine' or 'attention'"),
        ("decode.lm_weight=-0.5", r"^decode\.lm_weight: .*greater than or equal to 0"),
        ("train.ema_decay=1.5", r"^train\.ema_decay: .*less than 1"),
        ("train.lr_schedule=linear", r"^train\.lr_schedule: .*'constant' or 'cosine'"),
        ("train.max_minutes=0", r"^train\.max_minutes: .*greater than 0"),
        ("model.directions=3", r"^model\.directions: .*less than or equal to 2"),
        ("train.swapped_pairs=maybe", r"^train\.swapped_pairs: expected true/false"),
    ],
)
def test_new_fields_refuse_bad_values_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        apply_overrides(Config(), [override])
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- the rules each field declares


def test_former_defaults_fill_only_what_an_old_config_json_lacks():
    from couplet.core.config import with_former_defaults

    old = {"model": {"embed_dim": 16}, "train": {"ema_decay": 0.9}, "decode": {}, "vocab_size": 50}
    filled = with_former_defaults(old)
    assert filled["model"] == {"kind": "gated_cnn", "directions": 1, "output": "full", "adaptive_cutoffs": (0.125, 0.33),
                               "adaptive_div": 1.0, "word_features": False, "embed_dim": 16}
    assert filled["train"] == {"lr_schedule": "constant", "warmup_steps": 0, "ema_decay": 0.9, "max_minutes": None,
                               "swapped_pairs": False, "extra_share": 0.0}
    assert filled["decode"] == {"no_reuse": False, "lm_weight": 0.0, "phrase_uni": 0.0, "phrase_bi": 0.0, "phrase_tri": 0.0,
                                "default_blocklist": False, "block_input": False} and filled["vocab_size"] == 50
    assert "data" not in filled and old["model"] == {"embed_dim": 16}  # no section invented, the input untouched
    assert config_from_dict(with_former_defaults(Config().to_dict())) == Config()  # a complete config keeps its values


def test_the_fields_that_may_change_on_resume_are_declared_on_the_fields():
    from couplet.core.config import may_change_on_resume

    assert may_change_on_resume("train") == {"epochs", "max_steps", "checkpoint_every", "num_threads", "patience", "nproc"}
    assert may_change_on_resume("model") == frozenset()


def test_the_resume_check_follows_the_declarations():
    from couplet.modelling.checkpoint import run_fingerprint

    config = Config()
    same = run_fingerprint(config, 10, "k")
    assert set(same) == {"model", "train", "vocab_size", "build_key"} and "epochs" not in same["train"]
    assert run_fingerprint(replace(config, "train", epochs=3, patience=9, num_threads=1), 10, "k") == same
    assert run_fingerprint(replace(config, "train", lr=0.5), 10, "k") != same
    assert run_fingerprint(replace(config, "model", n_blocks=2), 10, "k") != same
    assert run_fingerprint(replace(config, "decode", lm_weight=1.0), 10, "k") == same  # decoding never binds a checkpoint


def test_a_setting_keeps_its_constraints():
    with pytest.raises(ConfigError, match=r"^train\.warmup_steps: .*greater than or equal to 0"):
        apply_overrides(Config(), ["train.warmup_steps=-1"])
    with pytest.raises(ConfigError, match=r"^train\.nproc: .*greater than or equal to 1"):
        apply_overrides(Config(), ["train.nproc=0"])


def test_no_reuse_is_on_by_default_and_off_for_a_folder_written_before_it():
    from couplet.core.config import with_former_defaults

    assert Config().decode.no_reuse is True
    assert apply_overrides(Config(), ["decode.no_reuse=false"]).decode.no_reuse is False
    old = config_from_dict(with_former_defaults({"decode": {"constrained": True, "tone": False}}))
    assert old.decode.no_reuse is False  # an old config.json answers as it did: reuse allowed
    assert config_from_dict(with_former_defaults({"decode": {"no_reuse": True}})).decode.no_reuse is True
