"""The human-readable summary that ``factorlm info`` prints for a saved folder.

:func:`format_info` is a pure function of the metadata (the ``factorlm.json`` record plus
``params_total``): no model, no files.  It keeps the summary short — ranks grouped into a small
table of module type x layer, the recipe as ``key: value`` lines without the settings left at their
defaults — and every field is optional, so folders written by older versions (or by hand) print too.
``factorlm info --json`` remains the way to see the full record.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

# the tail of a module name after the layer index -> a short name for the table
_ABBREV = {
    # BERT / RoBERTa / ELECTRA / MiniLM
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn.out",
    "intermediate.dense": "ffn.in",
    "output.dense": "ffn.out",
    # DeBERTa
    "attention.self.query_proj": "query",
    "attention.self.key_proj": "key",
    "attention.self.value_proj": "value",
    "attention.self.in_proj": "qkv",
    # DistilBERT
    "attention.q_lin": "query",
    "attention.k_lin": "key",
    "attention.v_lin": "value",
    "attention.out_lin": "attn.out",
    "ffn.lin1": "ffn.in",
    "ffn.lin2": "ffn.out",
    # decoder-style blocks
    "self_attn.q_proj": "query",
    "self_attn.k_proj": "key",
    "self_attn.v_proj": "value",
    "self_attn.o_proj": "attn.out",
    "self_attn.out_proj": "attn.out",
    "mlp.gate_proj": "ffn.gate",
    "mlp.up_proj": "ffn.up",
    "mlp.down_proj": "ffn.down",
    "mlp.fc1": "ffn.in",
    "mlp.fc2": "ffn.out",
    "fc1": "ffn.in",
    "fc2": "ffn.out",
}

# recipe keys already shown in the header
_HEADER_KEYS = ("task", "method", "structure")
# recipe keys always shown when set, even at their default value (they define the compression)
_ALWAYS_SHOWN = ("keep", "rank", "ranks")
_TABLE_WIDTH = 100  # wrap the layer columns beyond this many characters


def format_info(meta: dict[str, Any], path: str) -> str:
    """The text ``factorlm info PATH`` prints: header, parameters, scores, ranks, recipe.

    ``meta`` is the folder's ``factorlm.json`` content plus ``params_total`` (what
    :func:`factorlm.api.info` returns).  Returns the lines joined by newlines, without a trailing one.
    """
    lines: list[str] = []
    lines += _header(meta, path)
    if meta.get("task") == "lm":
        lines += ["  " + line for line in lm_lines(meta)]
        lines += _ranks(meta)
        lines += _recipe(meta.get("recipe"), base_model=meta.get("base_model"))
        return "\n".join(lines)
    lines += _parameters(meta)
    lines += _scores(meta)
    lines += _ranks(meta)
    lines += _recipe(meta.get("recipe"), base_model=meta.get("base_model"))
    return "\n".join(lines)


# -- header -------------------------------------------------------------------------------------


def _header(meta: dict[str, Any], path: str) -> list[str]:
    lines = [str(path)]
    what = [f"{k} {meta[k]}" for k in ("method", "structure", "task") if meta.get(k)]
    if what:
        lines.append("  " + ", ".join(what))
    model = meta.get("model_class")
    base = meta.get("base_model")
    if model or base:
        text = str(model or "model") + (f" from {base}" if base else "")
        lines.append(f"  {'model':<15} {text}")
    created = meta.get("created")
    versions = meta.get("versions")
    version = versions.get("factorlm") if isinstance(versions, dict) else None
    if created or version:
        text = str(created or "") + (f"{' ' if created else ''}(factorlm {version})" if version else "")
        lines.append(f"  {'created':<15} {text}")
    return lines


# -- parameters ---------------------------------------------------------------------------------


def _parameters(meta: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, str]] = []
    acc = meta.get("accounting") if isinstance(meta.get("accounting"), dict) else {}
    total = meta.get("params_total", acc.get("model_params_after"))
    before = acc.get("model_params_before")
    if _is_num(total):
        text = f"{int(total):,}"
        if _is_num(before) and before and before != total:
            text += f" (dense {int(before):,}, {total / before:.1%} kept)"
        rows.append(("total", text))
    tb, ta = acc.get("target_weights_before"), acc.get("target_weights_after")
    if _is_num(tb) and _is_num(ta) and tb:
        rows.append(("target weights", f"{int(tb):,} -> {int(ta):,} ({ta / tb:.1%} kept)"))
    flops = meta.get("flops_per_sequence")
    if isinstance(flops, dict) and flops:
        dense, final = flops.get("dense"), flops.get("final")
        if _is_num(dense) and _is_num(final):
            text = f"{_si(dense)} -> {_si(final)}"
            if final:
                text += f" ({dense / final:.2f}x fewer"
                text += f", seq len {meta['seq_len_for_flops']})" if meta.get("seq_len_for_flops") else ")"
        else:
            text = _compact(flops)
        rows.append(("FLOPs/sequence", text))
    lat = meta.get("latency")
    measured = isinstance(lat, dict) and "dtypes" in lat
    if lat not in (None, {}, []) and not measured:
        rows.append(("latency", _compact(lat)))
    return _section("parameters", rows) + (latency_lines(lat) if measured else [])


# -- scores -------------------------------------------------------------------------------------


def _scores(meta: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, str]] = []
    scores = meta.get("scores")
    if isinstance(scores, dict):
        for phase, m in scores.items():
            rows.append((str(phase), _metrics(m)))
    baseline = meta.get("baseline")
    if isinstance(baseline, dict) and baseline:
        rows.append((baseline_names(meta.get("task"))[0], _metrics(baseline)))
    teacher = meta.get("teacher")
    if teacher not in (None, "", {}, []):
        rows.append(("teacher", _compact(teacher)))
    lines = _section("scores", rows)
    warnings = meta.get("warnings")
    if isinstance(warnings, str):
        warnings = [warnings]
    if isinstance(warnings, (list, tuple)) and warnings:
        if not lines:
            lines = ["scores"]
        lines += [f"  WARNING: {w}" for w in warnings]
    return lines


_EXTRAS = ("steps", "best_step", "seconds_per_step", "cached")


def _metrics(m: Any) -> str:
    """A phase's dev metrics, then what training recorded: steps, the selection score and step."""
    if not isinstance(m, dict):
        return _value(m)
    parts = [f"{k} {_value(v)}" for k, v in m.items() if k not in _EXTRAS and not str(k).startswith("select_")]
    notes = []
    if m.get("steps") is not None:
        notes.append(f"{m['steps']} steps")
    sel = {k[7:]: v for k, v in m.items() if str(k).startswith("select_")}
    for k, v in sel.items():
        notes.append(f"held-out {k} {_value(v)}" + (f", kept step {m['best_step']}" if m.get("best_step") is not None else ""))
    if m.get("cached"):
        notes.append("cached")
    if notes:
        parts.append(f"({', '.join(notes)})")
    return "  ".join(parts)


def baseline_names(task: str | None) -> tuple[str, str]:
    """``(row name, description)`` of the trivial baseline a task's scores are compared with."""
    from .config import is_qa_task

    if task and is_qa_task(task):
        return "trivial", "the first words of every context, as long as the median training answer"
    return "majority", "always the training set's majority class"


def score_rows(scores: dict[str, Any], baseline: dict[str, Any] | None = None, task: str | None = None) -> list[str]:
    """One aligned line per phase (every metric), and the trivial baseline beneath (the majority class;
    QA: the first words of the context)."""
    rows = [(str(p), _metrics(m)) for p, m in (scores or {}).items()]
    if baseline:
        name, what = baseline_names(task)
        rows.append((name, _metrics(baseline) + f"  ({what})"))
    width = max((len(r[0]) for r in rows), default=0)
    return [f"{name:<{width}}  {text}" for name, text in rows]


# -- ranks --------------------------------------------------------------------------------------


def _split_name(name: str) -> tuple[str, int | None, str]:
    """``bert.encoder.layer.3.attention.self.query`` -> ``("bert.encoder.layer", 3, "attention.self.query")``."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            prefix, rest = ".".join(parts[:i]), ".".join(parts[i + 1:])
            return prefix, int(p), rest or prefix
    return "", None, name


def _cell(spec: Any) -> str:
    """A short tag for one module's structure parameters (a rank for low rank)."""
    if not isinstance(spec, dict):
        return "?"
    if isinstance(spec.get("inner"), dict):  # a mixed_rank wrapper
        return _cell(spec["inner"])
    s = spec.get("structure")
    if s == "monarch":
        return f"b{spec.get('nblocks', '?')}r{_rank_text(spec.get('block_rank'))}"
    if s == "blockwise":
        return f"{spec.get('nblocks_out', '?')}x{spec.get('nblocks_in', '?')}r{_rank_text(spec.get('block_rank'))}"
    if "kept_rank" in spec and "rank" in spec and spec["kept_rank"] != spec["rank"]:  # svd_masked
        return f"{spec['kept_rank']}/{spec['rank']}"
    if "rank" in spec:
        return _rank_text(spec["rank"])
    return str(s or "?")


def _rank_text(r: Any) -> str:
    """An int as it is; a grid of ranks (block-wise, non-uniform) as its min-max range."""
    if isinstance(r, (list, tuple)):
        flat = [x for row in r for x in (row if isinstance(row, (list, tuple)) else [row])]
        nums = [x for x in flat if _is_num(x)]
        if not nums:
            return "?"
        lo, hi = min(nums), max(nums)
        return f"{lo}" if lo == hi else f"{lo}-{hi}"
    return "?" if r is None else str(r)


def _legend(structures: list[str]) -> str:
    known = {
        "lowrank": "rank",
        "svd_masked": "kept rank[/rank]",
        "monarch": "b<nblocks>r<block rank>",
        "blockwise": "<out>x<in> blocks r<block rank>",
    }
    return "; ".join(f"{s}: {known.get(s, s)}" for s in structures)


def _ranks(meta: dict[str, Any]) -> list[str]:
    mods = meta.get("modules")
    if not isinstance(mods, dict) or not mods:
        return []
    info = meta.get("method_info") if isinstance(meta.get("method_info"), dict) else {}
    kept_dense = [n for n in (info.get("dense") or []) if isinstance(n, str) and n not in mods]

    # group: (prefix, type suffix) -> layer -> cell, in order of first appearance
    groups: dict[tuple[str, str], dict[int | None, str]] = {}
    shapes: dict[tuple[str, str], list[str]] = {}
    layers: set[int] = set()
    structures: list[str] = []
    planned = info.get("ranks") if isinstance(info.get("ranks"), dict) else {}
    names = [n for n in dict.fromkeys([*planned, *mods, *kept_dense]) if n in mods or n in kept_dense]
    for name in names:
        spec = mods.get(name)
        prefix, layer, suffix = _split_name(name)
        key = (prefix, suffix)
        cell = _cell(spec) if spec is not None else "dense"
        groups.setdefault(key, {})[layer] = cell
        if isinstance(spec, dict):
            inner = spec.get("inner") if isinstance(spec.get("inner"), dict) else spec
            shape = inner.get("shape")
            if isinstance(shape, (list, tuple)) and len(shape) == 2:
                text = f"{shape[0]}x{shape[1]}"
                if text not in shapes.setdefault(key, []):
                    shapes[key].append(text)
            st = str(inner.get("structure"))
            if st not in structures:
                structures.append(st)
        if layer is not None:
            layers.add(layer)

    labels = _labels(list(groups))
    cols = sorted(layers)
    n_layers = f", {len(cols)} layer{'s' * (len(cols) != 1)}" if cols else ""
    lines = [f"modules ({len(mods)} factorized{n_layers}; cell = {_legend(structures)}"
             + (f"; {len(kept_dense)} kept dense" if kept_dense else "") + ")"]

    label_w = max(len(labels[k]) for k in groups)
    shape_text = {k: ",".join(shapes.get(k, [])) or "?" for k in groups}
    shape_w = max(len(s) for s in shape_text.values())
    layer_rows, other_rows = [], []
    for key, cells in groups.items():
        lead = f"  {labels[key]:<{label_w}}  {shape_text[key]:<{shape_w}}  "
        if set(cells) == {None}:
            other_rows.append(lead + cells[None])
            continue
        # modules under this type without a layer index would be lost in the table: keep them apart
        row = [cells.get(layer, "-") for layer in cols]
        if None in cells:
            other_rows.append(f"  {labels[key]:<{label_w}}  {shape_text[key]:<{shape_w}}  (no layer) {cells[None]}")
        if len(set(row)) == 1 and len(cols) > 1:
            layer_rows.append((lead, None, f"all layers: {row[0]}"))
        else:
            layer_rows.append((lead, row, None))

    lead_w = 2 + label_w + 2 + shape_w + 2
    if any(row is not None for _, row, _ in layer_rows):
        cell_w = max([len(f"L{c}") for c in cols] + [len(x) for _, row, _ in layer_rows if row for x in row])
        per_line = max(1, (_TABLE_WIDTH - lead_w) // (cell_w + 1))
        chunks = [range(i, min(i + per_line, len(cols))) for i in range(0, len(cols), per_line)]
        for ci, chunk in enumerate(chunks):
            head = " ".join(f"{'L' + str(cols[j]):>{cell_w}}" for j in chunk)
            lines.append(f"  {'type':<{label_w}}  {'shape':<{shape_w}}  {head}")
            for lead, row, text in layer_rows:
                if row is not None:
                    lines.append(lead + " ".join(f"{row[j]:>{cell_w}}" for j in chunk))
                elif ci == 0:
                    lines.append(lead + text)
    else:
        lines += [lead + text for lead, _, text in layer_rows]
    lines += other_rows
    return [line.rstrip() for line in lines]


def _labels(keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Short, unique row labels: the abbreviation when unambiguous, else the full suffix."""
    abbr = {k: _ABBREV.get(k[1], k[1]) for k in keys}
    by_label: dict[str, set[str]] = {}
    for (_, suffix), a in abbr.items():
        by_label.setdefault(a, set()).add(suffix)
    labels = {k: (a if len(by_label[a]) == 1 else k[1]) for k, a in abbr.items()}
    prefixes = {p for p, _ in keys if p}
    if len(prefixes) > 1:  # two stacks (e.g. encoder and decoder layers): say which one
        labels = {k: (f"{k[0]}:{lab}" if k[0] else lab) for k, lab in labels.items()}
    return labels


# -- recipe -------------------------------------------------------------------------------------


def _defaults() -> dict[str, Any]:
    try:
        from .config import RunConfig
    except Exception:  # noqa: BLE001 - a summary never fails on this
        return {}
    out = {}
    for f in dataclasses.fields(RunConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _recipe(recipe: Any, base_model: Any = None) -> list[str]:
    """``key: value`` lines for the settings that were set: not empty, not the default, not in the header."""
    if not isinstance(recipe, dict) or not recipe:
        return []
    defaults = _defaults()
    shown: dict[str, Any] = {}
    at_default = 0
    for k, v in recipe.items():
        if k in _HEADER_KEYS or _empty(v) or (k == "model" and v == base_model):
            continue
        if k == "method_options" and isinstance(v, dict):
            shown.update({f"method_options.{ok}": ov for ok, ov in v.items() if not _empty(ov)})
            continue
        if k not in _ALWAYS_SHOWN and k in defaults and _same(v, defaults[k]):
            at_default += 1
            continue
        shown[k] = v
    lines = ["recipe" + (f" ({at_default} more at their defaults: --json for all)" if at_default else "")]
    if not shown:
        return lines
    w = max(len(k) for k in shown)
    lines += [f"  {k + ':':<{w + 1}} {_value(shown[k], recipe=True)}" for k in sorted(shown)]
    return lines


# -- formatting helpers -------------------------------------------------------------------------


def _section(title: str, rows: list[tuple[str, str]]) -> list[str]:
    if not rows:
        return []
    w = max(15, max(len(k) for k, _ in rows))
    return [title] + [f"  {k:<{w}} {v}".rstrip() for k, v in rows]


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _empty(v: Any) -> bool:
    return v is None or v is False or (isinstance(v, (str, list, tuple, dict)) and len(v) == 0)


def _same(a: Any, b: Any) -> bool:
    if _is_num(a) and _is_num(b):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return type(a) is type(b) and a == b


def _value(v: Any, recipe: bool = False) -> str:
    """A metric with 4 decimals; in a recipe, numbers as given; containers as compact JSON."""
    if isinstance(v, float) and not recipe:
        return f"{v:.4f}"
    if isinstance(v, bool):
        return str(v).lower() if recipe else str(v)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, separators=(", ", ": "), default=str)
    return str(v)


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:g}"


def _compact(v: Any) -> str:
    """One line for a value of unknown shape: ``a=1 b=2`` for a flat dict, ``a: x=1, y=2; b: ...`` nested."""
    if isinstance(v, dict):
        parts = []
        for k, x in v.items():
            if isinstance(x, dict):
                parts.append(f"{k}: " + ", ".join(f"{ik}={_num(iv)}" for ik, iv in x.items()))
            else:
                parts.append(f"{k}={_num(x)}")
        sep = "; " if any(isinstance(x, dict) for x in v.values()) else "  "
        return sep.join(parts)
    return _num(v)


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, tuple, dict)):
        return json.dumps(x, default=str)
    return re.sub(r"\s+", " ", str(x))


# -- latency ------------------------------------------------------------------------------------


def latency_lines(lat: Any) -> list[str]:
    """A measured-latency record (``profiling.compare_latency`` + ``flop_ratio``) as aligned lines."""
    if not isinstance(lat, dict) or not isinstance(lat.get("dtypes"), dict):
        return [f"latency  {_compact(lat)}"] if lat else []
    where = lat.get("device", "?") + (f", {lat['threads']} threads" if lat.get("threads") else "")
    limit = f"; FLOP-ratio limit {lat['flop_ratio']:.2f}x" if lat.get("flop_ratio") else ""
    lines = [f"latency (batch {lat.get('batch_size')} x {lat.get('seq_len')} tokens, {where}; "
             f"median of {lat.get('rounds')} rounds{limit})"]
    for dt, res in lat["dtypes"].items():
        if not isinstance(res, dict):
            continue
        names = [n for n, r in res.items() if isinstance(r, dict) and "median_ms" in r]
        parts = [f"{n} {res[n]['median_ms']:.1f} ms" + (f" ({res[n]['sequences_per_s']:,.0f} seq/s)"
                                                         if res[n].get("sequences_per_s") else "") for n in names]
        sp = res.get("speedup") or {}
        text = "  ".join(parts) + "".join(f"  -> {v:.2f}x" for v in sp.values())
        lines.append(f"  {dt:<5} {text}")
    return lines


def lm_lines(meta: dict[str, Any]) -> list[str]:
    """The summary of a ``--task lm`` run: perplexity per stage (and as a multiple of dense), exact
    parameter and byte accounting with the SVD-LLM ratio, FLOPs per token, greedy samples and the
    measured prefill / decode speed."""
    lines: list[str] = []
    scores = meta.get("scores") or {}
    info = meta.get("method_info") or {}
    dense = (scores.get("dense") or {}).get("perplexity")
    text = (info.get("text") or {})
    ev, cal = text.get("evaluation") or {}, text.get("calibration") or {}
    if ev:
        lines.append(f"perplexity on {ev.get('source')} ({ev.get('tokens', 0):,} tokens)"
                     + (f"; calibration {cal.get('source')}, {cal.get('tokens', 0):,} tokens "
                        f"({cal.get('windows')} x {cal.get('window_tokens')})" if cal else "; no calibration data"))
    for phase, m in scores.items():
        if not isinstance(m, dict) or m.get("perplexity") is None:
            continue
        p = float(m["perplexity"])
        rel = f"  ({p / dense:.2f}x dense)" if dense and phase != "dense" else ""
        lines.append(f"  {phase:<11} {p:>12.3f}{rel}")
    acc = meta.get("accounting") or {}
    if acc.get("target_weights_before") and acc.get("quantized"):
        q = acc["quantized"]
        grid = (f"codes on {len(q['grids'])} grids ({', '.join(f'{k} x{v}' for k, v in q['grids'].items())})"
                if q.get("grids") else f"int{q['bits']} codes in groups of {q['group_size']}")
        lines.append(f"target weights {acc['target_weights_before']:,} -> {grid} + "
                     f"{acc['target_weights_after'] - acc['target_weights_before']:,} correction weights")
    elif acc.get("target_weights_before"):
        lines.append(f"target weights {acc['target_weights_before']:,} -> {acc['target_weights_after']:,} "
                     f"({acc['target_ratio']:.2%} kept; SVD-LLM ratio {acc.get('svd_llm_ratio', 1 - acc['target_ratio']):.2f})")
    if acc.get("target_bytes_after"):
        lines.append(f"target bytes   {acc['target_bytes_after'] / 2**20:,.1f} MiB stored = {acc['target_bytes_vs_bf16']:.3f} "
                     f"of their bf16 bytes")
    if acc.get("model_params_before"):
        parts = acc.get("parts_before") or {}
        extra = (f"; embeddings {parts['embeddings']:,}, LM head {'tied' if not parts.get('lm_head') else format(parts['lm_head'], ',')}"
                 if parts else "")
        lines.append(f"model params   {acc['model_params_before']:,} -> {acc['model_params_after']:,} "
                     f"({acc['model_ratio']:.2%}{extra})")
    if acc.get("bytes_after"):
        disk = f", {acc['bytes_on_disk'] / 2**20:.1f} MiB on disk" if acc.get("bytes_on_disk") else ""
        lines.append(f"weights        {acc['bytes_before'] / 2**20:.1f} MiB -> {acc['bytes_after'] / 2**20:.1f} MiB{disk}")
    fl = meta.get("flops_per_token") or {}
    if fl.get("dense") and fl.get("final"):
        lines.append(f"FLOPs/token    {fl['dense']:,} -> {fl['final']:,} ({fl['dense'] / fl['final']:.2f}x fewer, "
                     f"context {fl.get('context')})")
    for dt, r in (meta.get("latency") or {}).items():
        if not isinstance(r, dict) or "dense" not in r:
            continue
        d, c = r["dense"], r["compressed"]
        lines.append(f"speed {dt:<8} prefill {d['prefill_tokens_per_s']:,.0f} -> {c['prefill_tokens_per_s']:,.0f} tok/s "
                     f"({c['prefill_tokens_per_s'] / d['prefill_tokens_per_s']:.2f}x); decode "
                     f"{d['decode_tokens_per_s']:,.1f} -> {c['decode_tokens_per_s']:,.1f} tok/s "
                     f"({c['decode_tokens_per_s'] / d['decode_tokens_per_s']:.2f}x)")
    for k, v in (info.get("samples") or {}).items():
        lines.append(f"sample {k:<7} {' '.join(str(v).split())[:110]!r}")
    gen = info.get("generation") or {}
    if "dense" in gen and "final" in gen:
        d, f = gen["dense"], gen["final"]
        lines.append(f"generation     greedy continuations looping {d['loops']}/{d['of']} -> {f['loops']}/{f['of']}, "
                     f"distinct bigrams {d['distinct_2']:.2f} -> {f['distinct_2']:.2f} ({f['new_tokens']} tokens each)")
    return lines
