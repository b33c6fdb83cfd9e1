"""`factorlm info`'s text summary (factorlm.summary.format_info): a pure function of the metadata."""

import re

from factorlm.summary import format_info

TYPES = {  # BERT module-name tail -> (short name in the table, [out, in])
    "attention.self.query": ("query", [384, 384]),
    "attention.self.key": ("key", [384, 384]),
    "attention.self.value": ("value", [384, 384]),
    "attention.output.dense": ("attn.out", [384, 384]),
    "intermediate.dense": ("ffn.in", [1536, 384]),
    "output.dense": ("ffn.out", [384, 1536]),
}


def lowrank_modules(n_layers=6, rank=64, exceptions=None):
    exceptions = exceptions or {}
    mods = {}
    for i in range(n_layers):
        for tail, (_, shape) in TYPES.items():
            name = f"bert.encoder.layer.{i}.{tail}"
            mods[name] = {"structure": "lowrank", "shape": shape, "bias": True, "rank": exceptions.get(name, rank)}
    return mods


def make_meta(**extra):
    meta = {
        "format_version": 1,
        "model_class": "BertForSequenceClassification",
        "modules": lowrank_modules(exceptions={"bert.encoder.layer.3.attention.self.query": 32}),
        "task": "rotten_tomatoes",
        "method": "svd",
        "structure": "lowrank",
        "base_model": "/models/all-MiniLM-L6-v2",
        "teacher": None,
        "method_info": {},
        "scores": {
            "dense": {"accuracy": 0.7858823529411765, "f1": 0.8154158215010142, "steps": 94},
            "factorized": {"accuracy": 0.61, "f1": 0.55},
            "finetune": {"accuracy": 0.74, "f1": 0.76, "steps": 200},
            "final": {"accuracy": 0.74, "f1": 0.76},
        },
        "accounting": {"target_weights_before": 10616832, "target_weights_after": 5308416,
                       "model_params_before": 22713602, "model_params_after": 17405186},
        "flops_per_sequence": {"dense": 2900000000, "final": 1500000000},
        "seq_len_for_flops": 128,
        "recipe": {
            "model": None, "task": "rotten_tomatoes", "data_dir": None, "text_columns": None, "max_length": 64,
            "max_train_samples": 1500, "batch_size": 32, "seed": 0, "learning_rate": 5e-05, "epochs": 2.0,
            "max_steps": None, "progress": False, "method": "svd", "keep": 0.25, "rank": None,
            "structure": "lowrank", "include": [], "exclude": [], "rank_policy": "uniform",
            "method_options": {"em_iters": 10, "importance": "platon"}, "output": "runs/demo", "overwrite": True,
        },
        "versions": {"python": "3.11.7", "factorlm": "0.1.0", "torch": "2.13.0"},
        "created": "2026-11-23T14:10:34+00:00",
        "params_total": 17405186,
    }
    meta.update(extra)
    return meta


def table_rows(text):
    """{row label: [cells]} for the rank table's per-layer rows, and {label: text} for collapsed rows."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if re.search(r"\bL0\b", line))
    cols = re.findall(r"L\d+", lines[head])
    per_layer, collapsed = {}, {}
    for line in lines[head + 1:]:
        if not line.startswith("  ") or line.startswith("   "):
            break
        label, shape, rest = line.split(None, 2)
        if rest.startswith("all layers:"):
            collapsed[label] = (shape, rest)
        elif len(rest.split()) == len(cols):
            per_layer[label] = (shape, rest.split())
        else:  # a module without a layer index, listed under the table
            assert len(rest.split()) == 1, line
    return cols, per_layer, collapsed


def section(text, title):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split(" (")[0] == title)
    out = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        out.append(line)
    return lines[start], out


def test_header_and_parameters():
    text = format_info(make_meta(), "runs/demo")
    lines = text.splitlines()
    assert lines[0] == "runs/demo"
    head = "\n".join(lines[:5])
    for piece in ("svd", "lowrank", "rotten_tomatoes", "BertForSequenceClassification", "/models/all-MiniLM-L6-v2",
                  "2026-11-23T14:10:34+00:00", "factorlm 0.1.0"):
        assert piece in head
    _, params = section(text, "parameters")
    joined = "\n".join(params)
    assert "17,405,186" in joined
    assert re.search(r"target weights\s+10,616,832 -> 5,308,416 \(50\.0% kept\)", joined)
    assert re.search(r"FLOPs/sequence\s+2\.90G -> 1\.50G \(1\.93x fewer, seq len 128\)", joined)
    assert "latency" not in text


def test_rank_table_shows_the_exception_and_collapses_uniform_rows():
    text = format_info(make_meta(), "m")
    cols, per_layer, collapsed = table_rows(text)
    assert cols == [f"L{i}" for i in range(6)]
    assert per_layer == {"query": ("384x384", ["64", "64", "64", "32", "64", "64"])}
    assert set(collapsed) == {"key", "value", "attn.out", "ffn.in", "ffn.out"}
    assert all(rest == "all layers: 64" for _, rest in collapsed.values())
    # each module type's shape appears once, not once per layer
    assert collapsed["ffn.in"][0] == "1536x384" and collapsed["ffn.out"][0] == "384x1536"
    assert text.count("1536x384") == 1
    assert "bert.encoder.layer" not in text  # no per-module lines
    assert "36 factorized" in text and "6 layers" in text


def test_scores_lines_have_every_metric_with_4_decimals_and_steps():
    _, rows = section(format_info(make_meta(), "m"), "scores")
    by_phase = {r.split()[0]: r for r in rows}
    assert list(by_phase) == ["dense", "factorized", "finetune", "final"]
    assert "accuracy 0.7859" in by_phase["dense"] and "f1 0.8154" in by_phase["dense"]
    assert "(94 steps)" in by_phase["dense"] and "steps" not in by_phase["final"]
    assert "f1 0.5500" in by_phase["factorized"]


def test_recipe_is_sorted_aligned_key_value_lines_without_empty_values():
    meta = make_meta()
    _, rows = section(format_info(meta, "m"), "recipe")
    assert rows, "the recipe section has lines"
    keys = []
    for r in rows:
        m = re.fullmatch(r"  ([\w.]+):( +)(\S.*)", r)
        assert m, r
        keys.append(m.group(1))
    assert keys == sorted(keys)
    assert len({r.index(":") + len(re.match(r"  [\w.]+:( *)", r).group(1)) for r in rows}) == 1  # values aligned
    assert "method_options.em_iters" in keys and "method_options.importance" in keys
    values = {r.split(":", 1)[0].strip(): r.split(":", 1)[1].strip() for r in rows}
    assert values["method_options.em_iters"] == "10" and values["method_options.importance"] == "platon"
    assert values["max_length"] == "64" and values["overwrite"] == "true" and values["keep"] == "0.25"
    # None, [], {}, False are left out, and so are the header's own fields
    for k in ("model", "data_dir", "text_columns", "max_steps", "progress", "rank", "include", "exclude",
              "method_options", "task", "method", "structure"):
        assert k not in keys


def test_warnings_baseline_and_teacher_absent_by_default():
    text = format_info(make_meta(), "m")
    assert "WARNING" not in text
    assert "majority" not in text
    assert "teacher" not in text.lower()


def test_warnings_baseline_and_teacher_shown_when_present():
    meta = make_meta(baseline={"accuracy": 0.5, "f1": 0.6666666666666666},
                     warnings=["final accuracy is at the majority-class baseline", "teacher scored below baseline"],
                     teacher="/cache/teachers/rotten_tomatoes-123")
    text = format_info(meta, "m")
    _, rows = section(text, "scores")
    majority = [r for r in rows if r.split()[0] == "majority"]
    assert len(majority) == 1 and "accuracy 0.5000" in majority[0] and "f1 0.6667" in majority[0]
    assert any(r.split()[0] == "teacher" and "/cache/teachers/rotten_tomatoes-123" in r for r in rows)
    warns = [line for line in text.splitlines() if "WARNING" in line]
    assert warns == ["  WARNING: final accuracy is at the majority-class baseline",
                     "  WARNING: teacher scored below baseline"]
    # a teacher given as a dict is shown on one line too
    text = format_info(make_meta(teacher={"path": "/t", "accuracy": 0.81}), "m")
    line = next(line for line in text.splitlines() if line.split()[:1] == ["teacher"])
    assert "path=/t" in line and "accuracy=0.81" in line


def test_latency_is_shown_compactly_whatever_its_shape():
    flat = format_info(make_meta(latency={"batch_size": 32, "dense_ms": 12.3456, "final_ms": 4.5}), "m")
    line = next(line for line in flat.splitlines() if line.strip().startswith("latency"))
    assert "batch_size=32" in line and "dense_ms=12.35" in line and "final_ms=4.5" in line
    nested = format_info(make_meta(latency={"dense": {"ms": 10.0, "device": "cpu"}, "final": {"ms": 5.0}}), "m")
    line = next(line for line in nested.splitlines() if line.strip().startswith("latency"))
    assert "dense: ms=10" in line and "final: ms=5" in line
    odd = format_info(make_meta(latency=[1.5, 2]), "m")
    assert any(line.strip().startswith("latency") for line in odd.splitlines())


def test_summary_is_short_for_a_6_layer_model():
    meta = make_meta(baseline={"accuracy": 0.5}, warnings=["w1", "w2"], teacher="/t", latency={"ms": 3.0})
    text = format_info(meta, "runs/demo")
    assert len(text.splitlines()) < 40
    assert max(len(line) for line in text.splitlines()) < 120


def test_monarch_cells_are_short_tags():
    mods = {}
    for i in range(6):
        for tail, (_, shape) in TYPES.items():
            mods[f"bert.encoder.layer.{i}.{tail}"] = {"structure": "monarch", "shape": shape, "bias": True,
                                                      "nblocks": 4, "block_rank": 8, "layout": "strided"}
    mods["bert.encoder.layer.5.output.dense"]["block_rank"] = 16
    text = format_info(make_meta(modules=mods, structure="monarch"), "m")
    cols, per_layer, collapsed = table_rows(text)
    assert per_layer == {"ffn.out": ("384x1536", ["b4r8"] * 5 + ["b4r16"])}
    assert collapsed["query"] == ("384x384", "all layers: b4r8")
    assert "monarch" in text and "strided" not in text


def test_blockwise_cells_and_grid_ranks():
    mods = {f"bert.encoder.layer.{i}.attention.self.query": {
        "structure": "blockwise", "shape": [384, 384], "bias": True, "nblocks_out": 2, "nblocks_in": 2,
        "block_rank": 16 if i else [[12, 20], [16, 16]]} for i in range(3)}
    _, per_layer, _ = table_rows(format_info(make_meta(modules=mods, structure="blockwise"), "m"))
    assert per_layer == {"query": ("384x384", ["2x2r12-20", "2x2r16", "2x2r16"])}


def test_rankdyna_kept_dense_and_differing_ranks():
    mods = lowrank_modules(n_layers=2)
    mods["bert.encoder.layer.1.intermediate.dense"]["rank"] = 40
    dense = "bert.encoder.layer.0.attention.self.value"
    del mods[dense]
    meta = make_meta(modules=mods, method="rankdyna",
                     method_info={"ranks": {n: 0 if n == dense else mods[n]["rank"] for n in lowrank_modules(2)},
                                  "dense": [dense]})
    text = format_info(meta, "m")
    cols, per_layer, collapsed = table_rows(text)
    assert cols == ["L0", "L1"]
    assert per_layer["value"] == ("384x384", ["dense", "64"])
    assert per_layer["ffn.in"] == ("1536x384", ["64", "40"])
    assert "1 kept dense" in text and "11 factorized" in text
    # rows keep the model's order: value sits between key and attn.out as in the plan
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.search(r"\bL0\b", line))
    order = [line.split()[0] for line in lines[start + 1:start + 7]]
    assert order == ["query", "key", "value", "attn.out", "ffn.in", "ffn.out"]


def test_names_without_a_layer_index():
    mods = {
        "pooler.dense": {"structure": "lowrank", "shape": [384, 384], "bias": True, "rank": 48},
        "classifier": {"structure": "lowrank", "shape": [2, 384], "bias": True, "rank": 2},
    }
    text = format_info(make_meta(modules=mods), "m")
    lines = text.splitlines()
    assert not any(re.search(r"\bL0\b", line) for line in lines)
    pooler = next(line for line in lines if line.split()[:1] == ["pooler.dense"])
    assert pooler.split()[1:] == ["384x384", "48"]
    classifier = next(line for line in lines if line.split()[:1] == ["classifier"])
    assert classifier.split()[1:] == ["2x384", "2"]


def test_layered_and_unlayered_names_together_and_unknown_tails():
    mods = lowrank_modules(n_layers=3)
    mods["bert.pooler.dense"] = {"structure": "lowrank", "shape": [384, 384], "bias": True, "rank": 8}
    for i in range(3):
        mods[f"bert.encoder.layer.{i}.attention.self.rel_proj"] = {"structure": "lowrank", "shape": [384, 384],
                                                                    "bias": True, "rank": 10 + i}
    text = format_info(make_meta(modules=mods), "m")
    cols, per_layer, collapsed = table_rows(text)
    assert cols == ["L0", "L1", "L2"]
    assert per_layer == {"attention.self.rel_proj": ("384x384", ["10", "11", "12"])}  # unknown: the full tail
    assert collapsed["query"] == ("384x384", "all layers: 64")
    assert any(line.split()[:1] == ["bert.pooler.dense"] and line.split()[-1] == "8" for line in text.splitlines())


def test_many_layers_wrap_instead_of_growing_wide():
    mods = lowrank_modules(n_layers=24, exceptions={"bert.encoder.layer.20.attention.self.query": 1000})
    text = format_info(make_meta(modules=mods), "m")
    assert max(len(line) for line in text.splitlines()) <= 110
    assert all(f"L{i}" in text for i in range(24))
    assert "1000" in text


def test_minimal_and_odd_metadata_do_not_fail():
    assert format_info({}, "x").splitlines()[0] == "x"
    text = format_info({"method": "dense", "modules": {}, "scores": {"dense": {"accuracy": 1, "note": "ok"}},
                        "versions": "not a dict", "accounting": None, "recipe": {"method_options": {}}}, "x")
    assert "accuracy 1" in text and "note ok" in text
    assert format_info({"modules": {"a.0.b": "not a dict"}}, "x")  # a malformed spec still prints
