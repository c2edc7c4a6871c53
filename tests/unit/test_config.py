"""Config loading (CLI > TOML > defaults, includes, list indices) and every validate() rule.

Each validation test asserts that the message names the field a user has to change.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from pathlib import Path

import pytest

from megatron_ts import config as config_mod
from megatron_ts.config import (
    Config,
    ConfigError,
    build_config,
    load_config,
    parse_overrides,
    resolve_stages,
    validate,
)

REPO = Path(__file__).resolve().parents[2]
DEBUG_TOML = REPO / "pretrain" / "configs" / "debug.toml"


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture()
def layered(tmp_path: Path) -> Path:
    """base.toml <- main.toml (include), returning main.toml."""
    write(
        tmp_path / "base.toml",
        """
        [train]
        steps = 10
        micro_batch = 2
        [optim]
        lr = 1e-3
        warmup_steps = 7
        """,
    )
    return write(
        tmp_path / "main.toml",
        """
        include = ["base.toml"]
        [train]
        steps = 20
        [optim]
        lr = 2e-3
        """,
    )


# ------------------------------------------------------------------------------------------------
# Precedence
# ------------------------------------------------------------------------------------------------


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.train.steps, cfg.train.global_batch, cfg.optim.lr) == (100, 8, 3e-4)


def test_toml_beats_defaults_and_include(layered: Path):
    cfg = load_config(layered)
    assert cfg.train.steps == 20  # main.toml beats base.toml
    assert cfg.train.micro_batch == 2  # only in base.toml: reaches through include
    assert cfg.optim.lr == 2e-3  # main.toml beats base.toml
    assert cfg.optim.warmup_steps == 7  # base.toml beats the default 100
    assert cfg.train.global_batch == 8  # set nowhere: the default
    assert cfg.optim.min_lr == 3e-5


def test_cli_beats_toml(layered: Path):
    cfg = load_config(layered, ["--train.steps", "30", "--optim.warmup_steps=3", "--job.name", "x"])
    assert cfg.train.steps == 30  # CLI beats main.toml
    assert cfg.optim.warmup_steps == 3  # CLI beats base.toml (`=` form)
    assert cfg.optim.lr == 2e-3  # untouched by the CLI
    assert cfg.job.name == "x"


def test_nested_include_and_cycle(tmp_path: Path):
    write(tmp_path / "a.toml", 'include = "b.toml"\n[job]\nseed = 1\n')
    write(tmp_path / "b.toml", 'include = ["sub/c.toml"]\n[job]\nseed = 2\nname = "b"\n')
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "c.toml", '[job]\nseed = 3\nname = "c"\nrun_dir = "rc"\n')
    cfg = load_config(tmp_path / "a.toml")
    assert (cfg.job.seed, cfg.job.name, cfg.job.run_dir) == (1, "b", "rc")

    write(tmp_path / "sub" / "c.toml", 'include = ["../a.toml"]\n')
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.toml")


def test_missing_include_names_the_file(tmp_path: Path):
    write(tmp_path / "a.toml", 'include = ["nope.toml"]\n')
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config(tmp_path / "a.toml")


def test_invalid_toml_names_the_file(tmp_path: Path):
    write(tmp_path / "bad.toml", "[train\nsteps = 1\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(tmp_path / "bad.toml")


def test_cli_list_index_and_literal_values(tmp_path: Path):
    path = write(
        tmp_path / "cur.toml",
        """
        [[curriculum.stages]]
        name = "s512"
        steps = 10
        [[curriculum.stages]]
        name = "s1024"
        steps = 20
        shuffle_window = 2
        """,
    )
    cfg = load_config(
        path,
        [
            "--curriculum.stages.1.steps",
            "200",
            "--curriculum.stages.0.lr=1e-4",
            "--data.sources",
            '[{url = "s3://b/x/", weight = 2.0}]',
            "--parallel.backend",
            "gloo",
        ],
    )
    assert [st.steps for st in cfg.curriculum.stages] == [10, 200]
    assert cfg.curriculum.stages[0].lr == 1e-4
    assert cfg.curriculum.stages[1].shuffle_window == 2  # the rest of the stage kept
    assert cfg.data.sources == [config_mod.SourceConfig(url="s3://b/x/", weight=2.0)]
    assert cfg.parallel.backend == "gloo"
    with pytest.raises(ConfigError, match="curriculum.stages.2"):
        load_config(path, ["--curriculum.stages.2.steps", "5"])


def test_parse_overrides_rejects_malformed():
    assert parse_overrides(["--a.b", "1", "--c.d=x y"]) == [(["a", "b"], 1), (["c", "d"], "x y")]
    with pytest.raises(ConfigError, match="--section.key"):
        parse_overrides(["steps", "3"])
    with pytest.raises(ConfigError, match="--train.steps has no value"):
        parse_overrides(["--train.steps"])


def test_debug_config_resolves():
    cfg = load_config(DEBUG_TOML)
    (stage,) = validate(cfg, world_size=1)
    assert (stage.resolution, stage.shuffle_window, stage.global_batch, stage.micro_batch) == (
        64,
        2,
        4,
        2,
    )
    # 64 px / 8 px per code = 8 x 8 codes; s = 2 -> 16 windows; 16 caption + <bos> + <boi>
    layout = stage.layout(8)
    assert (layout.image_codes, layout.image_positions, layout.seq_len) == (64, 16, 34)
    assert (stage.grid(8), stage.seq_len(8)) == (8, 34)
    assert (stage.lr, stage.min_lr, stage.warmup_steps, stage.tensor) == (1e-3, 1e-4, 2, 1)


def test_stage_inheritance_and_tokens_to_steps(tmp_path: Path):
    path = write(
        tmp_path / "cur.toml",
        """
        [optim]
        lr = 1e-3
        schedule = "wsd"
        [train]
        z_loss = 1e-5
        [tokenizer]
        downsample = 16
        [[curriculum.stages]]
        name = "a"
        resolution = 512
        caption_len = 62
        global_batch = 4
        tokens = 10000
        [[curriculum.stages]]
        name = "b"
        resolution = 1024
        shuffle_window = 2
        steps = 3
        lr = 5e-4
        z_loss = 0.0
        tensor = 2
        """,
    )
    a, b = validate(load_config(path), world_size=None)
    # a: 62 + 2 text + 32^2 codes = 1088 positions x 4 samples = 4352 tokens/step; ceil(10000/4352)
    assert a.steps == 3
    assert (a.lr, a.schedule, a.z_loss, a.tensor) == (1e-3, "wsd", 1e-5, 1)
    assert (b.lr, b.schedule, b.z_loss, b.tensor) == (5e-4, "wsd", 0.0, 2)


# ------------------------------------------------------------------------------------------------
# Validation: every rule names its field
# ------------------------------------------------------------------------------------------------

# (overrides on top of debug.toml, world size, text the message must contain)
INVALID = {
    "grid-not-divisible-by-window": (["--model.shuffle_window", "3"], 1, "model.shuffle_window"),
    "grid-names-resolution": (["--model.shuffle_window", "3"], 1, "data.resolution"),
    "resolution-not-multiple-of-downsample": (["--data.resolution", "60"], 1, "data.resolution"),
    "hidden-not-divisible-by-s2": (
        [
            "--model.shuffle_window",
            "8",
            "--data.resolution",
            "64",
            "--tokenizer.downsample",
            "4",
            "--model.hidden_size",
            "96",
            "--model.num_heads",
            "4",
        ],
        1,
        "model.shuffle_window",
    ),
    "heads-not-divisible-by-tp": (["--parallel.tensor", "3"], None, "parallel.tensor"),
    "heads-named": (["--parallel.tensor", "3"], None, "model.num_heads"),
    "kv-heads-not-divisible-by-tp": (
        ["--model.num_heads", "8", "--model.num_kv_heads", "2", "--parallel.tensor", "4"],
        None,
        "model.num_kv_heads",
    ),
    "ffn-not-divisible-by-tp": (
        ["--model.ffn_hidden_size", "170", "--parallel.tensor", "4"],
        None,
        "model.ffn_hidden_size",
    ),
    "vocab-multiple-not-divisible-by-tp": (
        ["--model.flavor", "2.7B", "--model.vocab_multiple", "100", "--parallel.tensor", "8"],
        None,
        "model.vocab_multiple",
    ),
    "layers-not-divisible-by-pp": (["--parallel.pipeline", "3"], None, "parallel.pipeline"),
    "layers-named": (["--parallel.pipeline", "3"], None, "model.num_layers"),
    "zero2-with-pp": (
        ["--parallel.pipeline", "2", "--parallel.zero_stage", "2"],
        None,
        "parallel.zero_stage",
    ),
    "zero3-with-pp": (
        ["--parallel.pipeline", "2", "--parallel.zero_stage", "3"],
        None,
        "parallel.zero_stage",
    ),
    "zero-stage-out-of-range": (["--parallel.zero_stage", "4"], 1, "parallel.zero_stage"),
    "ema-decay-out-of-range": (["--train.ema_decay", "1.0"], 1, "train.ema_decay"),
    "ema-with-zero3": (
        ["--train.ema_decay", "0.99", "--parallel.zero_stage", "3"],
        2,
        "parallel.zero_stage = 1 or 2",
    ),
    # 4 ranks of DP x micro 2 = 8 does not divide 4
    "global-batch-vs-micro-x-dp": (["--train.global_batch", "4"], 4, "train.global_batch"),
    "global-batch-names-micro": (["--train.global_batch", "6"], 2, "train.micro_batch"),
    "world-not-divisible-by-tp-pp": (["--parallel.tensor", "2"], 3, "parallel.tensor"),
    "zero-steps": (["--train.steps", "0"], 1, "train.steps"),
    "zero-micro-batch": (["--train.micro_batch", "0"], 1, "train.micro_batch"),
    "zero-global-batch": (["--train.global_batch", "0"], 1, "train.global_batch"),
    "zero-tensor": (["--parallel.tensor", "0"], 1, "parallel.tensor"),
    "caption-dropout": (["--data.caption_dropout", "1.0"], 1, "data.caption_dropout"),
    "keep-last": (["--checkpoint.keep_last", "0"], 1, "checkpoint.keep_last"),
    "heads-vs-hidden": (["--model.num_heads", "5"], 1, "model.num_heads"),
    "heads-vs-kv-heads": (
        ["--model.num_heads", "4", "--model.num_kv_heads", "3"],
        1,
        "model.num_kv_heads",
    ),
    "vocab-multiple-zero": (["--model.vocab_multiple", "0"], 1, "model.vocab_multiple"),
    "shuffle-mlp-blocks": (["--model.shuffle_mlp_blocks", "-1"], 1, "model.shuffle_mlp_blocks"),
    # typos and wrong types
    "unknown-key": (["--train.stepz", "3"], 1, "train.stepz"),
    "unknown-key-hint": (["--train.stepz", "3"], 1, "did you mean 'steps'"),
    "unknown-section": (["--trian.steps", "3"], 1, "trian"),
    "wrong-type": (["--train.steps", "ten"], 1, "train.steps"),
    "fractional-int": (["--train.steps", "2.5"], 1, "train.steps"),
    "wrong-bool": (["--data.synthetic", "maybe"], 1, "data.synthetic"),
    # removed: the loader resumes at any DP size (docs/loader.md)
    "removed-on-dp-change": (["--data.on_dp_change", "next_epoch"], 1, "data.on_dp_change"),
    # bad choices
    "flavor": (["--model.flavor", "13B"], 1, "model.flavor"),
    "schedule": (["--optim.schedule", "cosin"], 1, "optim.schedule"),
    "attention-backend": (["--model.attention_backend", "xformers"], 1, "model.attention_backend"),
    "vq-format": (["--tokenizer.vq_format", "vqgan"], 1, "tokenizer.vq_format"),
    "activation-checkpointing": (
        ["--parallel.activation_checkpointing", "some"],
        1,
        "parallel.activation_checkpointing",
    ),
    "backend": (["--parallel.backend", "mpi"], 1, "parallel.backend"),
    "precision": (["--train.precision", "fp16"], 1, "train.precision"),
    "cfg-schedule": (["--sampling.cfg_schedule", "cosine"], 1, "sampling.cfg_schedule"),
    "cfg-scale": (["--sampling.cfg_scale", "0.5"], 1, "sampling.cfg_scale"),
    "temperature": (["--sampling.temperature", "-1"], 1, "temperature = -1"),
    "top-p": (["--sampling.top_p", "0"], 1, "top_p = 0"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_config_names_field(case: str):
    overrides, world, field = INVALID[case]
    with pytest.raises(ConfigError) as err:
        validate(load_config(DEBUG_TOML, overrides), world_size=world)
    assert field in str(err.value), str(err.value)
    assert "data/train" not in str(err.value)


def test_same_overrides_are_valid_when_fixed():
    """The invalid cases above fail because of the override, not because of debug.toml."""
    validate(load_config(DEBUG_TOML), world_size=1)
    validate(load_config(DEBUG_TOML, ["--train.global_batch", "8"]), world_size=4)
    validate(load_config(DEBUG_TOML, ["--parallel.tensor", "2", "--parallel.pipeline", "2"]), 4)
    validate(load_config(DEBUG_TOML, ["--parallel.pipeline", "2", "--parallel.zero_stage", "1"]), 2)
    # world_size None (dry run) skips only the layout checks that need a world size
    validate(load_config(DEBUG_TOML, ["--train.global_batch", "4"]), world_size=None)


CURRICULUM = """
[tokenizer]
downsample = 16
[[curriculum.stages]]
name = "s512"
resolution = 512
steps = 10
[[curriculum.stages]]
name = "s1024"
resolution = 1024
shuffle_window = 2
steps = 10
global_batch = 8
micro_batch = 2
"""

# (overrides, world size, text the message must contain): stage fields keep their index
INVALID_STAGE = {
    "stage-window": (
        ["--curriculum.stages.1.shuffle_window", "3"],
        1,
        "curriculum.stages[1].shuffle_window",
    ),
    "stage-resolution": (
        ["--curriculum.stages.0.resolution", "500"],
        1,
        "curriculum.stages[0].resolution",
    ),
    "stage-length": (["--curriculum.stages.1.steps", "0"], 1, "curriculum.stages[1].tokens"),
    "stage-schedule": (
        ["--curriculum.stages.0.schedule", "cos"],
        1,
        "curriculum.stages[0].schedule",
    ),
    "stage-carry-over": (
        ["--curriculum.stages.1.carry_over", "all"],
        1,
        "curriculum.stages[1].carry_over",
    ),
    "stage-tensor": (["--curriculum.stages.1.tensor", "3"], None, "curriculum.stages[1].tensor"),
    "stage-inherits-tensor": (["--parallel.tensor", "3"], None, "parallel.tensor"),
    "stage-pipeline": (
        ["--curriculum.stages.0.pipeline", "3"],
        None,
        "curriculum.stages[0].pipeline",
    ),
    "stage-global-batch": (
        ["--curriculum.stages.1.global_batch", "6"],
        2,
        "curriculum.stages[1].global_batch",
    ),
    "stage-name-shown": (["--curriculum.stages.1.global_batch", "6"], 2, "'s1024'"),
    "stage-typo": (["--curriculum.stages.0.stepz", "3"], 1, "curriculum.stages[0].stepz"),
    "stage-wrong-type": (["--curriculum.stages.0.steps", "x"], 1, "curriculum.stages[0].steps"),
}


@pytest.mark.parametrize("case", sorted(INVALID_STAGE))
def test_invalid_stage_names_indexed_field(case: str, tmp_path: Path):
    path = write(tmp_path / "cur.toml", CURRICULUM)
    validate(load_config(path), world_size=2)
    overrides, world, field = INVALID_STAGE[case]
    with pytest.raises(ConfigError) as err:
        validate(load_config(path, overrides), world_size=world)
    assert field in str(err.value), str(err.value)


def test_resolved_single_stage_copies_sections():
    cfg = load_config(DEBUG_TOML, ["--parallel.tensor", "2", "--optim.schedule", "wsd"])
    (st,) = resolve_stages(cfg)
    assert (st.name, st.steps, st.caption_len, st.tensor, st.schedule) == ("main", 20, 16, 2, "wsd")


# ------------------------------------------------------------------------------------------------
# Documentation of every key
# ------------------------------------------------------------------------------------------------


def _field_docstrings(cls: type) -> dict[str, str]:
    """Field name -> the string literal under it in the dataclass body."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                out[node.target.id] = nxt.value.value
    return out


SECTIONS = {f.name: type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)}
# the tables inside lists, documented as `curriculum.stages[].key` and `data.sources[].key`
SECTIONS["curriculum.stages[]"] = config_mod.StageConfig
SECTIONS["data.sources[]"] = config_mod.SourceConfig


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_key_has_a_docstring_and_a_row_in_docs(section: str):
    cls = SECTIONS[section]
    docs = _field_docstrings(cls)
    table = (REPO / "docs" / "config.md").read_text()
    for f in dataclasses.fields(cls):
        assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
        assert f"| `{section}.{f.name}` |" in table, (
            f"docs/config.md does not document {section}.{f.name}; add its row to the table"
        )


# A value of every config field that would fail later or silently do the wrong thing; fields in
# NO_BAD_VALUE take any value of their type (the type itself is checked when the file is read).
NAN, INF = float("nan"), float("inf")
BAD_VALUE = {
    "job.run_dir": "",
    "job.seed": -1,
    "model.flavor": "13B",
    "model.shuffle_window": 0,
    "model.shuffle_mlp_blocks": -1,
    "model.hidden_size": 0,
    "model.num_layers": 0,
    "model.num_heads": 0,
    "model.num_kv_heads": 0,
    "model.ffn_hidden_size": 0,
    "model.rope_theta": NAN,
    "model.norm_eps": 0.0,
    "model.init_std": -0.02,
    "model.vocab_multiple": 0,
    "model.attention_backend": "xformers",
    "tokenizer.text": "",
    "tokenizer.text_size": 0,
    "tokenizer.vq_format": "vqgan",
    "tokenizer.codebook_size": 0,
    "tokenizer.downsample": 0,
    "parallel.tensor": 0,
    "parallel.pipeline": 0,
    "parallel.zero_stage": 4,
    "parallel.activation_checkpointing": "some",
    "parallel.backend": "mpi",
    "optim.lr": NAN,
    "optim.min_lr": -1e-5,
    "optim.schedule": "cosin",
    "optim.warmup_steps": -1,
    "optim.decay_fraction": 0.0,
    "optim.weight_decay": -0.1,
    "optim.beta1": 1.0,
    "optim.beta2": -0.1,
    "optim.eps": 0.0,
    "optim.grad_clip": INF,
    "train.steps": 0,
    "train.micro_batch": 0,
    "train.global_batch": 0,
    "train.precision": "fp16",
    "train.z_loss": -1.0,
    "train.text_loss_weight": NAN,
    "train.max_nonfinite_in_row": 0,
    "train.ema_decay": 1.0,
    "data.sources.0.url": "",
    "data.sources.0.weight": 0.0,
    "data.resolution": -16,
    "data.caption_len": -1,
    "data.caption_dropout": 1.0,
    "data.num_workers": -1,
    "data.shuffle_buffer": -1,
    "data.max_error_rate": 1.5,
    "data.streams": -1,
    "data.buckets": ["16x9"],
    "data.grid_multiple": 0,
    "model.max_windows_per_side": -1,
    "curriculum.stages.0.buckets": ["1:1", "2:1"],  # with model.max_windows_per_side = 0
    "curriculum.stages.0.resolution": -512,
    "curriculum.stages.0.shuffle_window": 0,
    "curriculum.stages.0.sources.0.url": " ",
    "curriculum.stages.0.sources.0.weight": -1.0,
    "curriculum.stages.0.global_batch": 0,
    "curriculum.stages.0.micro_batch": 0,
    "curriculum.stages.0.caption_len": -1,
    "curriculum.stages.0.steps": 0,
    "curriculum.stages.0.tokens": -5,
    "curriculum.stages.0.lr": NAN,
    "curriculum.stages.0.min_lr": -1.0,
    "curriculum.stages.0.warmup_steps": -1,
    "curriculum.stages.0.schedule": "cos",
    "curriculum.stages.0.z_loss": -1.0,
    "curriculum.stages.0.carry_over": "all",
    "curriculum.stages.0.tensor": 0,
    "curriculum.stages.0.pipeline": 0,
    "checkpoint.interval_steps": -5,
    "checkpoint.interval_minutes": -1.0,
    "checkpoint.keep_last": 0,
    "checkpoint.load": "",
    "logging.interval": 0,
    "logging.level": "LOUD",
    "logging.preview_interval": -1,
    "logging.peak_tflops": 0.0,
    "sampling.cfg_scale": 0.5,
    "sampling.cfg_schedule": "cosine",
    "sampling.temperature": -1.0,
    "sampling.top_k": -1,
    "sampling.top_p": 0.0,
}
NO_BAD_VALUE = {
    "job.name": "any text (logs, TensorBoard)",
    "tokenizer.vq_checkpoint": "a path, opened and named where it is used (tokenize, export)",
    "data.resample_shards": "a flag",
    "data.s3_endpoint": "a URL, reached at run time (storage errors name it)",
    "data.synthetic": "a flag",
    "curriculum.stages.0.name": "any text",
    "checkpoint.load_optimizer": "a flag",
    "checkpoint.resume": "a flag",
    "checkpoint.save_on_exit": "a flag",
    "logging.tensorboard": "a flag",
    "logging.sample_keys": "a flag",
    "logging.preview_prompts": "any captions",
}


def _leaf_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted paths of every config field; list-of-section fields through their element 0."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            out += _leaf_fields(tp, f"{prefix}{f.name}.")
        elif item is not None and dataclasses.is_dataclass(item):
            out += _leaf_fields(item, f"{prefix}{f.name}.0.")
        else:
            out.append(prefix + f.name)
    return out


def _with_value(path: str, value) -> dict:
    """debug.toml plus one data source, and a one-stage curriculum for stage fields, with
    `path` set to `value`."""
    import copy
    import re

    from megatron_ts.config import load_toml

    data = copy.deepcopy(load_toml(DEBUG_TOML))
    data.setdefault("data", {})["sources"] = [{"url": "tokens/", "weight": 1.0}]
    if path.startswith("curriculum."):
        stage = {"name": "s", "resolution": 128, "steps": 4, "sources": [{"url": "tokens/"}]}
        data["curriculum"] = {"stages": [stage]}
    node = data
    parts = [int(p) if re.fullmatch(r"\d+", p) else p for p in path.split(".")]
    for part in parts[:-1]:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[parts[-1]] = value
    return data


def test_every_field_is_walked():
    fields = set(_leaf_fields(Config))
    assert fields == set(BAD_VALUE) | set(NO_BAD_VALUE), fields ^ (
        set(BAD_VALUE) | set(NO_BAD_VALUE)
    )
    assert not set(BAD_VALUE) & set(NO_BAD_VALUE)
    for path in ("data.resolution", "curriculum.stages.0.resolution"):  # the bases are valid
        validate(build_config(_with_value(path, 128)), world_size=1)


@pytest.mark.parametrize("path", sorted(BAD_VALUE))
def test_validate_rejects_a_bad_value_of_every_field(path: str):
    """Loading (choice fields) or validate() rejects every value that would fail later, naming
    the field."""
    import re

    with pytest.raises(ConfigError) as err:
        validate(build_config(_with_value(path, BAD_VALUE[path])), world_size=1)
    named = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", path)  # curriculum.stages[0].lr
    assert named in str(err.value), str(err.value)


def test_choice_fields_are_literals_checked_at_load_and_in_validate():
    """One list of values per choice field: the Literal; the export files' copies agree with it."""
    import typing

    from megatron_ts.config import CfgSchedule, VqFormat
    from megatron_ts.hf.generation_token_shuffle import CFG_SCHEDULES
    from megatron_ts.hf.vq_token_shuffle import VQ_FORMATS

    assert typing.get_args(VqFormat) == VQ_FORMATS
    assert typing.get_args(CfgSchedule) == CFG_SCHEDULES
    with pytest.raises(ConfigError, match=r"parallel.backend = 'mpi'; choose one of \['auto', "):
        load_config(None, ["--parallel.backend", "mpi"])
    cfg = load_config(None, [])
    cfg.train.precision = "fp16"  # built in code: load never saw it
    with pytest.raises(ConfigError, match=r"train.precision = 'fp16'; choose one of \['auto', "):
        validate(cfg)
    cfg = load_config(None, [])
    cfg.curriculum.stages = [config_mod.StageConfig(steps=1, carry_over="everything")]
    with pytest.raises(ConfigError, match=r"curriculum.stages\[0\].carry_over = 'everything'"):
        validate(cfg)


def test_config_imports_no_torch_and_flavors_imports_no_config():
    """config.py <-> models/flavors.py was an import cycle (broken by ModelConfig.shape)."""
    import subprocess
    import sys

    code = (
        "import sys, megatron_ts.models.flavors; assert 'megatron_ts.config' not in sys.modules; "
        "import megatron_ts.config; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
