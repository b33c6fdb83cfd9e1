"""Saved folders carry correct, reusable metadata: the saved architecture, umask-honouring modes,
and one-line load errors that name the module / tensor at fault."""

import json
import os
import stat

import pytest
import torch

from conftest import bert_targets, tiny_bert
from factorlm import models
from factorlm.errors import FactorLMError
from factorlm.factorize import factorize
from factorlm.layers import LowRankLinear, structure_from_spec

pytestmark = pytest.mark.usefixtures("one_thread")

QUERY0 = "bert.encoder.layer.0.attention.self.query"


def factorized_bert(rank: int = 8):
    model = tiny_bert()
    factorize(model, {n: {"rank": rank} for n in bert_targets(model)})
    return model


def edit_meta(folder, fn):
    f = folder / "factorlm.json"
    meta = json.loads(f.read_text())
    fn(meta)
    f.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A factorized tiny BERT saved once; tests copy it before tampering."""
    model = factorized_bert()
    return models.save(model, tmp_path_factory.mktemp("saved") / "m"), model


@pytest.fixture
def copy_of(saved, tmp_path):
    import shutil

    return shutil.copytree(saved[0], tmp_path / "m")


# -- 1. config.json names the saved architecture ----------------------------------------------
def test_config_names_the_saved_class_not_the_source(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    src = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, architectures=["BertForMaskedLM"])
    src.save_pretrained(tmp_path / "src")
    config = BertConfig.from_pretrained(tmp_path / "src")
    assert config.architectures == ["BertForMaskedLM"]
    model = BertForSequenceClassification(config).eval()
    before = config.to_dict()
    out = models.save(model, tmp_path / "m")
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["BertForSequenceClassification"]
    assert json.loads((out / "factorlm.json").read_text())["model_class"] == "BertForSequenceClassification"
    assert model.config.to_dict() == before  # the caller's config is left as it was
    assert type(models.load(out)).__name__ == "BertForSequenceClassification"


# -- 2. modes follow the umask ----------------------------------------------------------------
def _tokenizer(tmp_path):
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]) + "\n")
    return BertTokenizer(str(vocab))


def _modes(folder):
    files, dirs = {}, {folder.name: stat.S_IMODE(folder.stat().st_mode)}
    for root, ds, fs in os.walk(folder):
        for d in ds:
            dirs[os.path.join(root, d)] = stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode)
        for f in fs:
            files[os.path.relpath(os.path.join(root, f), folder)] = stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode)
    return files, dirs


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_saved_folder_honours_the_umask(tmp_path, umask, file_mode, dir_mode):
    model = tiny_bert(layers=1)
    tok = _tokenizer(tmp_path)
    old = os.umask(umask)
    try:
        out = models.save(model, tmp_path / "m", tokenizer=tok,
                          extra_files={"plots/a.txt": "x", "b.bin": b"\0", "c.txt": lambda p: p.write_text("c")})
        files, dirs = _modes(out)
        # overwrite goes through the same path
        out2 = models.save(model, tmp_path / "m", overwrite=True)
        files2, dirs2 = _modes(out2)
    finally:
        os.umask(old)
    assert {"config.json", "model.safetensors", "factorlm.json", "plots/a.txt", "b.bin", "c.txt"} <= set(files)
    assert any("tokenizer" in f or "vocab" in f for f in files)
    assert {f: oct(m) for f, m in files.items()} == {f: oct(file_mode) for f in files}
    assert {d: oct(m) for d, m in dirs.items()} == {d: oct(dir_mode) for d in dirs} and len(dirs) == 2
    assert set(files2.values()) == {file_mode} and set(dirs2.values()) == {dir_mode}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]


def test_current_umask_is_left_unchanged():
    from factorlm.models.io import current_umask

    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027 and current_umask() == 0o027
    finally:
        assert os.umask(old) == 0o027


# -- 3. weights that do not fit name the tensor and both shapes --------------------------------
def test_rank_edited_in_factorlm_json_names_module_and_shapes(copy_of):
    edit_meta(copy_of, lambda m: m["modules"][QUERY0].update(rank=4))
    with pytest.raises(FactorLMError) as e:
        models.load(copy_of)
    msg = str(e.value)
    assert "\n" not in msg
    assert "model.safetensors does not match factorlm.json" in msg
    # A (32, 4) vs (32, 8) is the first tensor of the module; B (4, 32) vs (8, 32) is the "+1 more"
    assert f"{QUERY0}.A expected (32, 4), found (32, 8) (+1 more)" in msg
    assert "Error(s) in loading" not in msg


def test_missing_and_unexpected_tensors_are_named_with_counts(copy_of):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(copy_of / "model.safetensors"))
    for k in [k for k in sd if k.startswith("bert.encoder.layer.1.")][:3]:
        del sd[k]
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, str(copy_of / "model.safetensors"))
    with pytest.raises(FactorLMError) as e:
        models.load(copy_of)
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing bert.encoder.layer.1." in msg and "(+2 more)" in msg
    assert "unexpected extra.weight" in msg
    assert "config.json and factorlm.json" in msg  # extra.weight is outside every factorized module


def test_dense_shape_mismatch_blames_the_config(copy_of):
    cfg = json.loads((copy_of / "config.json").read_text())
    cfg["vocab_size"] = 101
    (copy_of / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FactorLMError, match=r"does not match config\.json and factorlm\.json: "
                                            r"bert\.embeddings\.word_embeddings\.weight expected \(101, 32\), found \(100, 32\)"):
        models.load(copy_of)


def test_truncated_weights_file_is_a_one_line_error(copy_of):
    w = copy_of / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(FactorLMError, match="cannot read .*model.safetensors") as e:
        models.load(copy_of)
    assert "\n" not in str(e.value)


def test_round_trip_still_bit_exact(saved):
    out, model = saved
    ids = torch.randint(0, 100, (2, 7))
    assert torch.equal(models.load(out)(input_ids=ids).logits, model(input_ids=ids).logits)


def test_tied_weights_round_trip(tmp_path):
    """Tied embeddings are saved once by safetensors; the header check must not call the alias missing."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True)
    model = BertForMaskedLM(cfg).eval()
    dec, emb = model.cls.predictions.decoder.weight, model.bert.embeddings.word_embeddings.weight
    assert dec.data_ptr() == emb.data_ptr()
    factorize(model, {n: {"rank": 4} for n in bert_targets(model)})
    out = models.save(model, tmp_path / "m")
    loaded = models.load(out)
    ids = torch.randint(0, 100, (2, 5))
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# -- 4. specs that cannot be built name their module ------------------------------------------
def test_rank_out_of_range_names_the_module(copy_of):
    edit_meta(copy_of, lambda m: m["modules"][QUERY0].update(rank=500))
    with pytest.raises(FactorLMError) as e:
        models.load(copy_of)
    msg = str(e.value)
    assert msg.startswith(f"factorlm.json: module {QUERY0}: ")
    assert "rank must be in [1, 32] for a 32x32 matrix, got 500" in msg


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.pop("rank"), "the lowrank spec has no 'rank' entry"),
    (lambda s: s.update(rank="eight"), "invalid lowrank spec"),
    (lambda s: s.update(shape=[32]), "invalid lowrank spec"),
    (lambda s: s.update(structure="nope"), "unknown structure 'nope'"),
    (lambda s: s.pop("structure"), "a structure spec must be an object with a 'structure' entry"),
    (lambda s: s.update(shape=[32, 64], rank=8), "shape 32x64 does not match the 32x32 layer of BertForSequenceClassification"),
])
def test_malformed_spec_names_the_module(copy_of, edit, expected):
    edit_meta(copy_of, lambda m: edit(m["modules"][QUERY0]))
    with pytest.raises(FactorLMError) as e:
        models.load(copy_of)
    msg = str(e.value)
    assert msg.startswith(f"factorlm.json: module {QUERY0}: ") and expected in msg and "\n" not in msg


def test_structure_from_spec_errors_are_factorlm_errors():
    good = LowRankLinear(16, 8, 4).spec()
    assert isinstance(structure_from_spec(good), LowRankLinear)
    for bad in ([1, 2], {**good, "rank": 9}, {k: v for k, v in good.items() if k != "shape"}, {**good, "rank": None}):
        with pytest.raises(FactorLMError):
            structure_from_spec(bad)
