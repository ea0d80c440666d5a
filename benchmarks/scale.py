"""Layer streaming at scale: a streamed scan against an ordinary load-then-scan of a checkpoint larger
than the streaming needs, and streamed attack variants sharing their prefix against the same
variants run from scratch. Side by side in one run; ratios printed.

    OMP_NUM_THREADS=1 python benchmarks/scale.py            # writes ~6 GB, deletes it at the end

1. Writes a synthetic random-weight llama checkpoint in bfloat16 (sharded safetensors + index JSON,
   >= --gb GB), one shard at a time, so writing it needs little memory.
2. Streamed scan (``load_model(stream=True)``) and ordinary scan (``load_model`` then ``scan``), each in
   its own subprocess; peak resident memory is each child's ``ru_maxrss`` (``resource.getrusage``,
   also read as RUSAGE_CHILDREN in the parent: the streamed child runs first, so the children's
   maximum after the second is the ordinary peak). Goals: streamed peak <= 10% of the ordinary
   peak, streamed time <= 1.5x. The two scans must agree.
3. Streamed perplexity of 4 variants (original, top-k zeroing, its random control, super weight)
   sharing the blocks before the attacked layer, against the 4 run from scratch (each block read
   once per variant). Goal: >= 1.3x faster, identical perplexities. Measured twice: through
   ``streamed_variants`` (each block read once for all the variants) and through ``run_variants``,
   the path of ``cardhouse attack --stream`` (one streamed perplexity per variant, the prefix shared).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
PROMPTS = 4  # built-in prompts scanned (the point is the memory, not the statistics)


def config_for(gigabytes: float) -> dict:
    block = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * (HIDDEN // HEADS * KV_HEADS) + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    rest = 2 * VOCAB * HIDDEN + HIDDEN
    layers = math.ceil((gigabytes * 1e9 / 2 - rest) / block)
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048,
            "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2}


def write_checkpoint(folder: Path, gigabytes: float, layers_per_shard: int = 4) -> dict:
    """Random bfloat16 weights (std 0.02, norms 1), written shard by shard with an index JSON."""
    import torch
    from safetensors.torch import save_file

    config = config_for(gigabytes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    _write_tokenizer(folder)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    kv = HIDDEN // HEADS * KV_HEADS
    n = config["num_hidden_layers"]
    groups = [["rest"]] + [list(range(s, min(s + layers_per_shard, n))) for s in range(0, n, layers_per_shard)]
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        tensors = {}
        if group == ["rest"]:
            tensors = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "lm_head.weight": rand(VOCAB, HIDDEN),
                       "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}
        for layer in group if group != ["rest"] else []:
            p = f"model.layers.{layer}."
            tensors.update({p + "self_attn.q_proj.weight": rand(HIDDEN, HIDDEN),
                            p + "self_attn.k_proj.weight": rand(kv, HIDDEN),
                            p + "self_attn.v_proj.weight": rand(kv, HIDDEN),
                            p + "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
                            p + "mlp.gate_proj.weight": rand(INTERMEDIATE, HIDDEN),
                            p + "mlp.up_proj.weight": rand(INTERMEDIATE, HIDDEN),
                            p + "mlp.down_proj.weight": rand(HIDDEN, INTERMEDIATE),
                            p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                            p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)})
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return {"bytes": total, "layers": n, "shards": len(groups)}


def _write_tokenizer(folder: Path) -> None:
    """A character-level tokenizer (the benchmark measures memory and time, not language)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(i) for i in range(32, 127)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)


# ---- the children ---------------------------------------------------------------------------------


def child_scan(folder: str, stream: bool) -> dict:
    from cardhouse.analysis import find_massive_weights, load_prompts, scan
    from cardhouse.models import load_model

    start = time.perf_counter()
    lm = load_model(folder, dtype="bfloat16", bos=True, stream=stream)
    loaded = time.perf_counter() - start
    prompts = load_prompts("builtin", limit=PROMPTS)
    result = scan(lm, prompts, progress=False)
    mw = find_massive_weights(lm, prompts, n_prompts=PROMPTS, k=3)
    return {"seconds": time.perf_counter() - start, "load_seconds": loaded,
            "top1": [round(layer["top-1"], 2) for layer in result.layers], "indices": mw.indices, "layer": mw.layer}


def child_variants(folder: str, share: bool, cli: bool = False) -> dict:
    """The 4 variants' perplexities through ``streamed_variants`` (block-major: each block read once for
    every variant), or with ``cli`` through ``run_variants`` (the path of ``cardhouse attack --stream``:
    one whole streamed perplexity per variant, the prefix shared through ``reuse_prefix``)."""
    import torch

    from cardhouse.evaluation.perplexity import perplexity
    from cardhouse.evaluation.streamed import streamed_variants
    from cardhouse.interventions import random_indices, zero_rows, zero_super_weight
    from cardhouse.interventions.variants import Variant, run_variants
    from cardhouse.models import load_model
    from cardhouse.models.streaming import streamer_of

    lm = load_model(folder, dtype="bfloat16", bos=True, stream=True)
    layer = len(lm.blocks) // 2
    top = [0, 1, 2, 3, 4]
    control = random_indices(INTERMEDIATE, 5, exclude=top, seed=0)
    variants = {"original": None, "top-5 zeroing": (layer, lambda: zero_rows(lm, layer, top)),
                "random-5 zeroing": (layer, lambda: zero_rows(lm, layer, control)),
                "super weight": (layer, lambda: zero_super_weight(lm, layer, 0, 0))}
    ids = torch.randint(4, 99, (2 * 63,), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    if cli:
        rows = run_variants(lm, [Variant(name, name, v[1], v[0]) if v else Variant(name, name, contextlib.nullcontext)
                                 for name, v in variants.items()],
                            lambda lm: {"ppl": perplexity(lm.model, ids, context=64, bos_id=lm.bos_id,
                                                          progress=False).ppl}, reuse=share)
        ppl = {row["kind"]: row["ppl"] for row in rows}
    else:
        results = streamed_variants(streamer_of(lm.model), ids, variants, context=64, bos_id=lm.bos_id,
                                    share_prefix=share, progress=False)
        ppl = {k: r.ppl for k, r in results.items()}
    return {"seconds": time.perf_counter() - start, "ppl": ppl}


def run_child(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["children_maxrss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/cardhouse-scale-ckpt"))
    parser.add_argument("--gb", type=float, default=6.0, help="checkpoint size (GB of bfloat16 weights)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards (a later run with the "
                        "same --folder and --gb reuses it instead of writing it again)")
    parser.add_argument("--part", choices=["scan", "variants", "all"], default="all",
                        help="scan: the memory and time of a streamed scan; variants: the shared prefix")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, folder, flag = args.child
        result = (child_scan(folder, flag == "1") if kind == "scan"
                  else child_variants(folder, flag == "1", cli=kind == "cli-variants"))
        result["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    try:
        start = time.perf_counter()
        info = existing_checkpoint(args.folder, args.gb) or write_checkpoint(args.folder, args.gb)
        print(f"checkpoint: {info['bytes'] / 1e9:.2f} GB bfloat16, {info['layers']} layers, {info['shards']} shards, "
              f"{'reused' if info.get('reused') else 'written'} in {time.perf_counter() - start:.0f} s ({args.folder})")
        if args.part in ("scan", "all"):
            scan_part(args.folder)
        if args.part in ("variants", "all"):
            variants_part(args.folder)
    finally:
        if not args.keep:
            shutil.rmtree(args.folder, ignore_errors=True)


def load_average() -> str:
    """The machine is shared: the 1/5/15-minute load averages printed beside each ratio."""
    return "load average " + "/".join(f"{x:.1f}" for x in os.getloadavg())


def existing_checkpoint(folder: Path, gigabytes: float) -> dict | None:
    """A checkpoint an earlier ``--keep`` run wrote completely (its index JSON is written last) with the
    same config: reused, since writing 6 GB takes minutes."""
    index, config = folder / "model.safetensors.index.json", folder / "config.json"
    if not (index.is_file() and config.is_file()) or json.loads(config.read_text()) != config_for(gigabytes):
        return None
    weight_map = json.loads(index.read_text())
    return {"bytes": weight_map["metadata"]["total_size"], "layers": config_for(gigabytes)["num_hidden_layers"],
            "shards": len(set(weight_map["weight_map"].values())), "reused": True}


def scan_part(folder: Path) -> None:
    streamed = run_child("scan", str(folder), "1")
    ordinary = run_child("scan", str(folder), "0")
    assert streamed["top1"] == ordinary["top1"] and streamed["indices"] == ordinary["indices"], \
        "streamed and ordinary scans disagree"
    print(f"scan, streamed: peak {streamed['maxrss_mib']:,.0f} MiB, {streamed['seconds']:.1f} s")
    print(f"scan, ordinary: peak {ordinary['maxrss_mib']:,.0f} MiB, {ordinary['seconds']:.1f} s "
          f"(load {ordinary['load_seconds']:.1f} s); children's max after both: "
          f"{ordinary['children_maxrss_mib']:,.0f} MiB")
    print(f"  peak ratio streamed/ordinary: {streamed['maxrss_mib'] / ordinary['maxrss_mib']:.3f} (goal <= 0.10)")
    print(f"  time ratio streamed/ordinary: {streamed['seconds'] / ordinary['seconds']:.2f} (goal <= 1.5); "
          f"{load_average()}")


def variants_part(folder: Path) -> None:
    for kind, label in (("variants", "streamed_variants"), ("cli-variants", "run_variants, the CLI's path")):
        shared = run_child(kind, str(folder), "1")
        scratch = run_child(kind, str(folder), "0")
        for name, value in shared["ppl"].items():
            assert abs(value / scratch["ppl"][name] - 1) <= 1e-5, (name, value, scratch["ppl"][name])
        print(f"4 streamed variants ({label}), shared prefix: {shared['seconds']:.1f} s; "
              f"from scratch: {scratch['seconds']:.1f} s")
        print(f"  speed-up: {scratch['seconds'] / shared['seconds']:.2f}x (goal >= 1.3); perplexities identical: "
              + ", ".join(f"{k} {v:.2f}" for k, v in shared["ppl"].items()) + f"; {load_average()}")


if __name__ == "__main__":
    main()
