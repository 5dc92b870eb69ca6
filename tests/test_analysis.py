"""Analysis: the first-token KL arithmetic, the update statistics against a brute-force sort,
and the commands on tiny-world models."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from sftknow_eval.analysis.kl import (
    check_same_tokenizer,
    compare_first_tokens,
    kl_full_vocab,
    kl_over_top_ids,
    run_kl,
    summarize,
)
from sftknow_eval.analysis.updates import update_statistics
from sftknow_eval.errors import UserError
from sftknow_eval.facts import write_jsonl
from sftknow_eval.weights.regions import layer_of, module_of
from sftknow_eval.world.shipped import load_split, model_path


def test_kl_over_top_ids_by_hand():
    tuned = torch.tensor([[math.log(3.0), math.log(1.0), -50.0, -60.0]], dtype=torch.float64)
    base = torch.tensor([[0.0, 0.0, 5.0, -70.0]], dtype=torch.float64)
    kl, ids = kl_over_top_ids(tuned, base, top_k=2)
    assert ids.tolist() == [[0, 1]]
    # tuned renormalised over ids {0, 1}: p = (3/4, 1/4); base over the same ids: q = (1/2, 1/2)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl.item() == pytest.approx(expected, abs=1e-12)
    # the base's large logit on id 2 is ignored: only the tuned model's top ids count
    assert kl_over_top_ids(tuned, base + torch.tensor([[0, 0, 40.0, 0]]), top_k=2)[0].item() == \
        pytest.approx(expected, abs=1e-12)


def test_kl_is_zero_for_equal_distributions_and_full_vocab_matches_torch():
    logits = torch.randn(5, 50)
    assert torch.allclose(kl_over_top_ids(logits, logits)[0], torch.zeros(5, dtype=torch.float64))
    other = torch.randn(5, 50)
    reference = torch.nn.functional.kl_div(torch.log_softmax(other.double(), -1),
                                           torch.log_softmax(logits.double(), -1),
                                           log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_full_vocab(logits, other), reference)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The shipped base model and a perturbed copy saved as a 'tuned' model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("pair")
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    model = AutoModelForCausalLM.from_pretrained(model_path())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layers.3.mlp" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder / "tuned")
    tokenizer.save_pretrained(folder / "tuned")
    return model_path(), folder / "tuned"


def test_compare_first_tokens_on_tiny_models(tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, tuned_dir = tiny_pair
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir)
    facts = [f for f in load_split("test_in_domain") if f.meta["exposure"] >= 30][:12]
    same, templates = compare_first_tokens(base, base, tokenizer, facts, "tiny")
    assert set(templates) == {f.relation for f in facts}
    # same model, different prompts: KL is not 0 but finite and non-negative
    assert all(r.kl >= 0 and math.isfinite(r.kl) for r in same)
    records, _ = compare_first_tokens(base, tuned, tokenizer, facts, "tiny")
    assert [r.id for r in records] == [f.id for f in facts]
    assert all(r.tuned_prompt.startswith("<|question|>") for r in records)
    summary = summarize(records)
    assert summary["facts"] == 12 and summary["median"] >= 0
    assert sum(s["facts"] for s in summary["per_relation"].values()) == 12


def _annotated_folder(folder, facts, categories):
    for fact, category in zip(facts, categories, strict=True):
        fact.mastery["tiny"] = {"scheme": "ye2025", "category": category}
    write_jsonl(facts, folder / "facts" / "test.jsonl")
    (folder / "probe_config.json").write_text(json.dumps({
        "complete": True, "files": {"test": "facts/test.jsonl"}, "facts": len(facts),
        "model_key": "tiny", "scheme": "ye2025"}))
    return folder


def test_run_kl_writes_outputs_and_rejects_bad_input(tiny_pair, tmp_path):
    base_dir, tuned_dir = tiny_pair
    facts = load_split("test_in_domain")[:10]
    annotated = _annotated_folder(tmp_path / "ann", facts, ["D4"] * 6 + ["D0"] * 4)
    summary = run_kl(str(base_dir), str(tuned_dir), annotated, out=tmp_path / "kl")
    assert summary["facts"] == 6 and summary["category"] == "D4"
    lines = (tmp_path / "kl" / "kl.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["category"] == "D4"
    assert json.loads((tmp_path / "kl" / "kl_summary.json").read_text())["mean"] == summary["mean"]
    with pytest.raises(UserError, match="no test facts in category D2"):
        run_kl(str(base_dir), str(tuned_dir), annotated, category="D2")


def test_different_tokenizers_are_refused():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    other = AutoTokenizer.from_pretrained(model_path())
    other.add_tokens(["zzzunseen"])
    check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(model_path()))
    with pytest.raises(UserError, match="tokenizers differ"):
        check_same_tokenizer(tokenizer, other)


def _checkpoint_pair(folder, seed=0):
    """A Llama-layout pair with ties, zeros in the base and unchanged elements."""
    generator = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    shapes = {"model.embed_tokens.weight": (40, 8)}
    for layer in range(3):
        for module, shape in (("self_attn.q_proj", (8, 8)), ("self_attn.k_proj", (4, 8)),
                              ("self_attn.v_proj", (4, 8)), ("self_attn.o_proj", (8, 8)),
                              ("mlp.gate_proj", (16, 8)), ("mlp.up_proj", (16, 8)),
                              ("mlp.down_proj", (8, 16)), ("input_layernorm", (8,))):
            shapes[f"model.layers.{layer}.{module}.weight"] = shape
    for name, shape in shapes.items():
        b = torch.randn(shape, generator=generator).round(decimals=1)  # many equal values
        b[torch.rand(shape, generator=generator) < 0.1] = 0.0  # zeros in the base
        delta = 0.01 * torch.randn(shape, generator=generator)
        delta[torch.rand(shape, generator=generator) < 0.3] = 0.0  # unchanged elements
        delta[torch.rand(shape, generator=generator) < 0.05] = 0.5  # larger sparse updates
        base[name], tuned[name] = b.contiguous(), (b + delta).contiguous()
    for label, tensors in (("base", base), ("tuned", tuned)):
        (folder / label).mkdir()
        save_file(tensors, str(folder / label / "model.safetensors"))
        (folder / label / "config.json").write_text(json.dumps(
            {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return base, tuned


def test_update_statistics_match_brute_force(tmp_path):
    from sftknow_eval.weights.regions import natural_key

    base, tuned = _checkpoint_pair(tmp_path)
    stats = update_statistics(str(tmp_path / "base"), str(tmp_path / "tuned"),
                              concentration_ks=(1, 3, 7.5, 20, 60), share_ks=(1, 10, 20),
                              progress=False)
    names = sorted((n for n in base if "layers" in n and "norm" not in n), key=natural_key)
    assert stats["tensors"] == len(names)
    r = torch.cat([((tuned[n] - base[n]).abs() / (base[n].abs() + 1e-8)).flatten() for n in names])
    owner = torch.cat([torch.full((base[n].numel(),), i) for i, n in enumerate(names)])
    order = sorted(range(len(r)), key=lambda i: (-r[i].item(), i))  # restore's tie-break
    total = r.double().sum().item()
    assert stats["sum_r"] == pytest.approx(total, rel=1e-9)
    for k in (1, 3, 7.5, 20, 60):
        n = int(len(r) * k / 100)
        top = order[:n]
        assert stats["concentration"][str(k)] == pytest.approx(
            r.double()[top].sum().item() / total, rel=1e-9)
        assert stats["threshold_r"][str(k)] == pytest.approx(r[top[-1]].item())
    for k in (1, 10, 20):
        n = int(len(r) * k / 100)
        layers, modules = {}, {}
        for i in order[:n]:
            name = names[owner[i]]
            layers[str(layer_of(name))] = layers.get(str(layer_of(name)), 0) + 1 / n
            modules[module_of(name)] = modules.get(module_of(name), 0) + 1 / n
        got_layers = {key: v for key, v in stats["layer_shares"][str(k)].items() if v}
        got_modules = {key: v for key, v in stats["module_shares"][str(k)].items() if v}
        assert got_layers == pytest.approx(layers)
        assert got_modules == pytest.approx(modules)
        assert sum(stats["module_shares"][str(k)].values()) == pytest.approx(1.0)
    assert sum(stats["log10_r_histogram"]["counts"]) == len(r)


def test_updates_command_writes_json_and_plots(tmp_path):
    from sftknow_eval.cli import main

    _checkpoint_pair(tmp_path)
    code = main(["updates", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"),
                 "--out", str(tmp_path / "upd"), "--no-progress"])
    assert code == 0
    for name in ("updates.json", "concentration.png", "layer_shares.png", "module_shares.png",
                 "r_histogram.png"):
        assert (tmp_path / "upd" / name).stat().st_size > 0
    assert main(["updates", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"),
                 "--out", str(tmp_path / "x"), "--region", "re:nothing-matches"]) == 2


def _with_nan(source, target):
    """A copy of a model folder with one NaN in an MLP weight."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    name = next(n for n in weights if "layers.1.mlp.up_proj" in n)
    weights[name] = weights[name].clone()
    weights[name].view(-1)[5] = float("nan")
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target, name


def test_kl_refuses_nan_weights_and_writes_nothing(tiny_pair, tmp_path):
    base_dir, tuned_dir = tiny_pair
    annotated = _annotated_folder(tmp_path / "ann", load_split("test_in_domain")[:4], ["D4"] * 4)
    bad, name = _with_nan(tuned_dir, tmp_path / "nan-tuned")
    with pytest.raises(UserError, match=f"tensor {name}: NaN or Inf values in the fine-tuned model"):
        run_kl(str(base_dir), str(bad), annotated, out=tmp_path / "kl")
    assert not (tmp_path / "kl").exists()


def test_strict_json_refuses_non_finite_values():
    from sftknow_eval.analysis.checks import strict_json

    assert json.loads(strict_json({"mean": 0.5}, "kl_summary.json")) == {"mean": 0.5}
    for value in (float("nan"), float("inf")):
        with pytest.raises(UserError, match="kl_summary.json: a value is NaN or infinite"):
            strict_json({"per_relation": {"P17": {"mean": value}}}, "kl_summary.json")


def test_updates_refuse_nan_like_restore_and_identical_models(tmp_path, capsys):
    from sftknow_eval.cli import main

    base, _ = _checkpoint_pair(tmp_path)
    nan = dict(base)
    nan["model.layers.1.mlp.up_proj.weight"] = base["model.layers.1.mlp.up_proj.weight"].clone()
    nan["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    (tmp_path / "nan").mkdir()
    save_file(nan, str(tmp_path / "nan" / "model.safetensors"))
    with pytest.raises(UserError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight: NaN or "
                                        "Inf values in the fine-tuned model"):
        update_statistics(str(tmp_path / "base"), str(tmp_path / "nan"), progress=False)
    code = main(["updates", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "base"),
                 "--out", str(tmp_path / "same"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "are identical in region 'transformer'" in err
    assert err.count(str(tmp_path / "base")) == 2 and not (tmp_path / "same").exists()


def test_update_analysis_reads_weights_without_restore_or_numba():
    """The update lens uses the weights layer only: importing it loads neither the restore
    package nor numba (the compiled restore loops)."""
    import subprocess
    import sys

    code = ("import sys, sftknow_eval.analysis.updates; "
            "print(sorted(m for m in sys.modules if m.startswith(('sftknow_eval.restore', 'numba'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
