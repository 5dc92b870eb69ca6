"""Restore: preflight and bad input, layer groups, outputs (card, stats, index), resume, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_restore_engine import load_dir, make_pair, run, save_model

from sftknow_eval.cli import main as cli_main
from sftknow_eval.errors import UserError
from sftknow_eval.restore import RestoreConfig, restore
from sftknow_eval.restore import passes as passes_module
from sftknow_eval.restore import pipeline as pipeline_module
from sftknow_eval.weights.regions import (
    layer_of,
    module_of,
    parse_layer_groups,
    select_region,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(var, "1")


@pytest.fixture
def pair():
    return make_pair(np.random.default_rng(7), layers=4)


def test_regions_and_names():
    names = [f"model.layers.{i}.{m}" for i in (0, 10, 2) for m in (
        "self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight")]
    names += ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    floats = set(names)
    transformer = select_region(names, "transformer", floats)
    assert [layer_of(n) for n in transformer] == [0, 0, 2, 2, 10, 10]
    assert all("norm" not in n for n in transformer)
    assert select_region(names, "attention", floats) == [
        f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 2, 10)]
    assert len(select_region(names, "mlp", floats)) == 3
    assert select_region(names, "embedding", floats) == ["lm_head.weight",
                                                         "model.embed_tokens.weight"]
    assert len(select_region(names, "all", floats)) == len(names)
    assert select_region(names, r"re:layers\.2\..*norm", floats) == [
        "model.layers.2.input_layernorm.weight"]
    assert module_of("model.layers.3.mlp.down_proj.weight") == "mlp.down"
    assert module_of("model.layers.3.self_attn.k_proj.weight") == "attn.k"
    assert parse_layer_groups("0-3,4-7, 9") == [(0, 3), (4, 7), (9, 9)]
    for bad in ("3-1", "a-b", ""):
        with pytest.raises(UserError):
            parse_layer_groups(bad)
    with pytest.raises(UserError, match="regular expression"):
        select_region(names, "re:(", floats)
    with pytest.raises(UserError, match="use one of"):
        select_region(names, "attn", floats)


def test_layer_groups_restore_whole_layers(tmp_path, pair):
    base, tuned = pair
    result = run(tmp_path, base, tuned, layers="0-1,3")
    got = load_dir(result.folders["layers0-1"])
    for name in tuned:
        layer = layer_of(name)
        in_region = "norm" not in name and layer is not None
        want = base[name] if in_region and layer in (0, 1) else tuned[name]
        assert torch.equal(got[name], want), name
    got3 = load_dir(result.folders["layers3"])
    assert torch.equal(got3["model.layers.3.mlp.up_proj.weight"],
                       base["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(got3["model.layers.0.mlp.up_proj.weight"],
                       tuned["model.layers.0.mlp.up_proj.weight"])
    stats = json.loads((result.folders["layers0-1"] / "restore_stats.json").read_text())
    assert stats["strategy"] == "layers" and stats["layers"] == "0-1"
    assert {k for k, v in stats["per_layer"].items() if v} == {"0", "1"}
    with pytest.raises(UserError, match="no tensor"):
        run(tmp_path / "again", base, tuned, layers="40-43")
    with pytest.raises(UserError, match="do not combine"):
        run(tmp_path / "both", base, tuned, layers="0-3", k=[5])


def test_outputs_card_stats_and_transformers_load(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    base_model = LlamaForCausalLM(config)
    base_model.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    with torch.no_grad():
        for p in base_model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    base_model.save_pretrained(tmp_path / "tuned", max_shard_size="40KB")
    (tmp_path / "tuned" / "tokenizer_config.json").write_text("{}")
    assert (tmp_path / "tuned" / "model.safetensors.index.json").exists()
    result = restore(RestoreConfig(base=str(tmp_path / "base"), tuned=str(tmp_path / "tuned"),
                                   out=tmp_path / "out", k=[5, 20], progress=False))
    folder = result.folders["top5"]
    tuned_files = sorted(p.name for p in (tmp_path / "tuned").glob("*.safetensors"))
    assert sorted(p.name for p in folder.glob("*.safetensors")) == tuned_files
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tuned_index = json.loads((tmp_path / "tuned" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == tuned_index["weight_map"]
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "README.md",
                 "restore_stats.json", "restore_stats.tsv", "restore_config.json"):
        assert (folder / name).is_file(), name
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    restored = load_dir(folder)
    for name, value in loaded.state_dict().items():
        if name in restored:
            assert torch.equal(value, restored[name]), name
    q = "model.layers.0.self_attn.q_proj.weight"
    base_q, tuned_q = load_dir(tmp_path / "base")[q], load_dir(tmp_path / "tuned")[q]
    got = restored[q]
    assert ((got == base_q) | (got == tuned_q)).all() and (got == base_q).any()

    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    # both models are local folders: no path goes into the metadata, the text names them
    assert card.data.base_model is None and "base_model" not in card.data.to_dict()
    assert str(tmp_path / "tuned") not in str(card.data.to_yaml())
    assert f"`{tmp_path / 'base'}`" in card.text
    fields = card.data.restore
    assert fields["strategy"] == "top" and fields["k"] == 5 and fields["region"] == "transformer"
    stats = json.loads((folder / "restore_stats.json").read_text())
    assert fields["restored_elements"] == stats["restored_elements"]
    assert stats["restored_elements"] == stats["region_elements"] * 5 // 100
    assert 0.05 <= stats["concentration"] <= 1 and stats["threshold_r"] > 0
    assert abs(sum(stats["per_module"].values()) - 1) < 1e-9
    assert stats["run"]["versions"]["torch"] == torch.__version__
    rows = (folder / "restore_stats.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:5] == ["tensor", "layer", "module", "numel", "restored"]
    assert sum(int(r.split("\t")[4]) for r in rows[1:]) == stats["restored_elements"]


def test_preflight_errors(tmp_path, pair):
    base, tuned = pair
    name = "model.layers.1.mlp.up_proj.weight"
    cases = {
        "missing from the base": ({k: v for k, v in base.items() if k != name}, tuned),
        "shape": ({**base, name: base[name][:6]}, tuned),
        "dtype": ({**base, name: base[name].half()}, tuned),
    }
    for i, (message, (b, t)) in enumerate(cases.items()):
        with pytest.raises(UserError, match=message) as info:
            run(tmp_path / str(i), b, t, k=[5])
        assert name in str(info.value)
    b = save_model(tmp_path / "arch" / "base", base)
    t = save_model(tmp_path / "arch" / "tuned", tuned)
    (t / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(UserError, match="architectures differ"):
        restore(RestoreConfig(base=str(b), tuned=str(t), out=tmp_path / "o", progress=False))


@pytest.mark.parametrize("which", ["base", "tuned"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_inf_named(tmp_path, pair, which, value):
    base, tuned = pair
    bad = {"base": dict(base), "tuned": dict(tuned)}
    name = "model.norm.weight" if value != value else "model.layers.2.self_attn.v_proj.weight"
    bad[which][name] = bad[which][name].clone()
    bad[which][name].view(-1)[3] = value
    label = "base" if which == "base" else "fine-tuned"
    with pytest.raises(UserError, match=f"{name}: NaN or Inf values in the {label} model"):
        run(tmp_path, bad["base"], bad["tuned"], k=[5])
    assert not (tmp_path / "out" / "top5").exists()


def test_bad_k_empty_region_identical(tmp_path, pair, caplog):
    base, tuned = pair
    for k in (0, 100, -1, 150):
        with pytest.raises(UserError, match="strictly between 0 and 100"):
            run(tmp_path / f"k{k}", base, tuned, k=[k])
    with pytest.raises(UserError, match="matches no"):
        run(tmp_path / "empty", base, tuned, region="re:nothing_here")
    with pytest.raises(UserError, match="less than one"):
        run(tmp_path / "tiny", base, tuned, k=[0.001])
    with pytest.raises(UserError, match="--threads -1"):
        run(tmp_path / "threads", base, tuned, k=[5], threads=-1)
    assert not (tmp_path / "threads" / "out").exists()
    with pytest.raises(UserError, match=r"fine-tuned model .*tuned and the base model .*base "
                       r"are identical .*nothing to restore"):
        run(tmp_path / "same", base, base, k=[5])
    assert not (tmp_path / "same" / "out" / "top5").exists()


def test_pickle_refused_unless_allowed(tmp_path, pair):
    base, tuned = pair
    for label, state in (("base", base), ("tuned", tuned)):
        folder = tmp_path / label
        folder.mkdir()
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cfg = dict(base=str(tmp_path / "base"), tuned=str(tmp_path / "tuned"), out=tmp_path / "out",
               k=[10], progress=False)
    with pytest.raises(UserError, match="--allow-pickle"):
        restore(RestoreConfig(**cfg))
    result = restore(RestoreConfig(**cfg, allow_pickle=True))
    folder = result.folders["top10"]
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    reference = run(tmp_path / "st", base, tuned, k=[10])
    assert load_dir(folder).keys() == load_dir(reference.folders["top10"]).keys()
    for name, value in load_dir(reference.folders["top10"]).items():
        assert torch.equal(load_dir(folder)[name], value)


def test_interrupted_run_leaves_nothing_complete_and_rerun_resumes(tmp_path, pair, monkeypatch):
    base, tuned = pair
    real = passes_module._write_selected

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(passes_module, "_write_selected", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, base, tuned, k=[5, 10])
    out = tmp_path / "out"
    assert not (out / "top5").exists() and not (out / "top10").exists()
    assert not list(out.iterdir())  # the unfinished folders were removed
    monkeypatch.setattr(passes_module, "_write_selected", real)
    cfg = RestoreConfig(base=str(tmp_path / "base"), tuned=str(tmp_path / "tuned"), out=out,
                        k=[5, 10], progress=False)
    first = restore(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["top10", "top5"]
    assert first.skipped == []
    shutil.rmtree(out / "top10")
    second = restore(cfg)
    assert second.skipped == ["top5"] and (out / "top10" / "restore_config.json").exists()
    with pytest.raises(UserError, match="different restore run"):
        restore(RestoreConfig(**{**cfg.__dict__, "region": "mlp"}))


def test_disk_space_checked_before_work(tmp_path, pair, monkeypatch):
    base, tuned = pair

    class Usage:
        free = 10

    monkeypatch.setattr(pipeline_module.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(UserError, match="not enough disk space"):
        run(tmp_path, base, tuned, k=[5])


def test_shard_names_cannot_escape(tmp_path, pair):
    base, tuned = pair
    folder = save_model(tmp_path / "evil", tuned)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "../outside.safetensors"}}))
    save_model(tmp_path / "base", base)
    with pytest.raises(UserError, match="outside the folder"):
        restore(RestoreConfig(base=str(tmp_path / "base"), tuned=str(folder),
                              out=tmp_path / "out", progress=False))


def test_cli(tmp_path, pair, capsys):
    base, tuned = pair
    b, t = save_model(tmp_path / "base", base), save_model(tmp_path / "tuned", tuned)
    code = cli_main(["restore", "--base", str(b), "--tuned", str(t), "--k", "1,5",
                     "--strategy", "random", "--seed", "3", "--out", str(tmp_path / "out"),
                     "--no-progress"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["random1", "random5"]
    card = (tmp_path / "out" / "random5" / "README.md").read_text()
    assert "seed: 3" in card and "strategy: random" in card
    code = cli_main(["restore", "--base", str(b), "--tuned", str(t), "--k", "100",
                     "--out", str(tmp_path / "o2")])
    assert code == 2 and "strictly between" in capsys.readouterr().err
    save_file({"w": torch.zeros(2)}, tmp_path / "x.safetensors")
    code = cli_main(["restore", "--base", str(tmp_path / "x.safetensors"), "--tuned", str(t),
                     "--out", str(tmp_path / "o3")])
    assert code == 2 and "expected a model folder" in capsys.readouterr().err


@pytest.mark.parametrize("shards", [1, 2])
def test_restored_pickle_checkpoint_loads_with_transformers(tmp_path, tiny_model_dir, shards):
    """--allow-pickle writes a standard folder (model.safetensors, or numbered shards and an
    index) that transformers loads, with the same values as restoring the safetensors pair."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = {k: v for k, v in load_file(tiny_model_dir / "model.safetensors").items()
            if k != "lm_head.weight"}  # tied to the embeddings
    generator = torch.Generator().manual_seed(1)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    names = sorted(base)
    for label, state in (("base", base), ("tuned", tuned)):
        folder = tmp_path / label
        shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        if shards == 1:
            torch.save(state, folder / "pytorch_model.bin")
        else:
            for i, part in enumerate(np.array_split(np.arange(len(names)), shards), start=1):
                torch.save({names[j]: state[names[j]] for j in part},
                           folder / f"pytorch_model-{i:05d}-of-{shards:05d}.bin")
    result = restore(RestoreConfig(base=str(tmp_path / "base"), tuned=str(tmp_path / "tuned"),
                                   out=tmp_path / "out", k=[20], progress=False,
                                   allow_pickle=True))
    folder = result.folders["top20"]
    written = sorted(p.name for p in folder.glob("*.safetensors"))
    if shards == 1:
        assert written == ["model.safetensors"]
        assert not (folder / "model.safetensors.index.json").exists()
    else:
        assert written == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(names)
        assert set(index["weight_map"].values()) == set(written)
    assert not list(folder.glob("pytorch_model*"))
    reference = run(tmp_path / "st", base, tuned, k=[20]).folders["top20"]
    want = load_dir(reference)
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert any(not torch.equal(want[n], tuned[n]) for n in names)  # something was restored
    for name in names:
        assert torch.equal(loaded[name], want[name]), name


def test_cli_identical_models_exit_2(tmp_path, pair, capsys):
    base, _ = pair
    b, t = save_model(tmp_path / "base", base), save_model(tmp_path / "same", base)
    code = cli_main(["restore", "--base", str(b), "--tuned", str(t), "--k", "5",
                     "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "are identical" in err and str(b) in err and str(t) in err
    assert not (tmp_path / "out" / "top5").exists()
