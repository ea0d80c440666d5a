"""Every command refuses bad input the same way (the table below): exit code 1, one ``error:`` line that
names the option and its allowed range, no traceback, no file written, and no weights loaded (the
loading functions are replaced by ones that fail the test). The ranges come from the model's config:
the tiny saved models have 2 layers, 48 FFN neurons, 4 heads, hidden size 32 and 128 positions."""

from __future__ import annotations

import os

import pytest
from conftest import CONTEXT, D_MLP, D_MODEL, N_LAYERS
from saved_models import save_tiny
from typer.testing import CliRunner

from cardhouse.cli import app
from cardhouse.validation import RULES

runner = CliRunner()
HEADS = 4


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Saved tiny models and bad model folders, outside the folder each test writes in."""
    root = tmp_path_factory.mktemp("models")
    save_tiny(root / "llama", "llama", plant=False)
    save_tiny(root / "gpt2", "gpt2", plant=False)
    from transformers import AutoConfig

    AutoConfig.for_model("opt", hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                         word_embed_proj_dim=32).save_pretrained(root / "opt")  # a family not in the adapter table
    AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
                         vocab_size=300, max_position_embeddings=128).save_pretrained(root / "bert")  # post-norm
    # o_proj reads 4 heads x 10 = 40 entries: a group of 16 divides the hidden size and the FFN width, not that
    AutoConfig.for_model("llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=10, vocab_size=300,
                         max_position_embeddings=128).save_pretrained(root / "llama-hd10")
    (root / "no-config").mkdir()
    (root / "no-config" / "tokenizer.json").write_text("{}")
    (root / "latin1.txt").write_bytes("Café au lait\n".encode("latin-1"))
    (root / "a-file").write_text("not a folder")
    from conftest import build
    from gguf_models import write_gguf

    write_gguf(build("llama"), root / "split.gguf", split_max_tensors=8)  # 3 parts
    (root / "split-00002-of-00003.gguf").unlink()
    write_gguf(build("llama"), root / "f64.gguf", float64=("blk.1.ffn_down.weight",))
    return root


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if anything tries to load weights."""
    import transformers

    def refuse(*args, **kwargs):
        pytest.fail("weights were loaded for a bad input")

    monkeypatch.setattr("cardhouse.models.loading._load_auto", refuse)
    monkeypatch.setattr("cardhouse.models.loading.load_gguf", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)


M = "{llama}"  # the tiny llama folder (filled in by the test)
G = "{gpt2}"  # the tiny GPT-2 folder (n_positions 128: the limit GPT-2 crashed on with 'index out of range')
R = f"1..{D_MLP}"  # k range
I = f"0..{D_MLP - 1}"  # index range
L = f"0..{N_LAYERS - 1}"
P = f"2..{CONTEXT}"

# command line, the words the error line must hold (the option and its allowed range, or what is wrong)
CASES = [
    # memory (issue 15)
    ("memory M --tokens 0", ["--tokens", ">= 1", "got 0"]),
    ("memory M --dtype float8", ["unknown dtype 'float8'"]),
    ("memory {models}/no-config", ["cannot read the config"]),
    ("scan -m M --device-map everywhere", ["unknown --device-map 'everywhere'"]),
    ("scan -m M --max-memory cpu=lots --device-map auto", ["--max-memory", "cannot read the size 'lots'"]),
    ("scan -m M --stream --device-map auto", ["--stream", "--device-map"]),
    ("scan -m M --stream --max-memory cpu=4KiB", ["--max-memory", "one decoder block", "4.00 KiB"]),
    ("scan -m M --device-map auto --max-memory cpu=4KiB", ["--max-memory", "largest decoder block", "4.00 KiB"]),
    ("scan -m M --device-map auto --max-memory disk=1GiB", ["--max-memory", "disk only"]),
    ("scan -m {models}/split-00001-of-00003.gguf", ["missing from", "split-00002-of-00003.gguf"]),
    ("scan -m {models}/split-00001-of-00003.gguf --stream", ["missing from", "split-00002-of-00003.gguf"]),
    ("scan -m {models}/f64.gguf --stream", ["blk.1.ffn_down.weight", "F64", "cannot dequantize"]),
    ("position -m M --stream", ["--stream serves", "attack, intervene, moe, report, scan, sweep"]),
    ("attack topk-zero -m M --spill-dir spill", ["--spill-dir", "needs --stream"]),
    ("attack topk-zero -m M --stream --spill-dir {models}/a-file", ["--spill-dir", "is a file"]),
    # lm-eval scores request by request through whole forward passes: refused, the alternative named (issue 16)
    ("attack topk-zero -m M --stream --context 64 --task arc_easy", ["--task", "--stream", "--device-map auto"]),
    ("sweep -m M --stream --context 64 --max-tokens 0 --task arc_easy", ["--task", "--stream", "--device-map auto"]),
    # 10^11 tokens of hidden states: far more than any disk here
    ("attack topk-zero -m M --stream --context 64 --max-tokens 100000000000 --spill-dir spill",
     ["not enough disk", "spill", "GiB are free"]),
    ("intervene set-zero -m M --stream --context 64 --max-tokens 100000000000 --spill-dir spill",
     ["not enough disk"]),
    ("report -m M --stream --context 64 --max-tokens 100 --task arc_easy", ["--task", "--stream"]),
    ("report -m M --stream --context 64 --max-tokens 100000000000 --spill-dir spill", ["not enough disk"]),
    # scan (fix 4: --limit 0 used all prompts, --limit -3 all but 3, --batch-size 0 crashed)
    ("scan -m M --limit 0", ["--limit", ">= 1", "got 0"]),
    ("scan -m M --limit -3", ["--limit", ">= 1"]),
    ("scan -m M --batch-size 0", ["--batch-size", ">= 1"]),
    ("scan -m M --k 0", ["--k", R]),
    ("scan -m M --k 49", ["--k", R, "48 FFN neurons"]),
    ("scan -m M --layer 2", ["--layer", L, "2 layers"]),
    ("scan -m M --layer -1", ["--layer", L]),
    ("scan -m M --min-ratio 0", ["--min-ratio", "> 0"]),
    ("scan -m M --min-abs -1", ["--min-abs", ">= 0"]),
    ("scan -m M --json out", ["--json", "a file path", "folder"]),  # an existing folder (made by the test)
    ("scan -m M --json {models}/a-file/scan.json", ["--json", "a folder", "is a file"]),
    ("scan -m M --json /proc/cardhouse/scan.json", ["--json", "writable", "/proc"]),
    ("scan -m M -o {models}/a-file", ["--out", "a folder", "is a file"]),
    # fix 6: clear messages
    ("scan -m M --prompts {models}/latin1.txt", ["latin1.txt", "not UTF-8", "offset 3"]),
    ("scan -m M --prompts missing.txt", ["prompt file not found", "missing.txt"]),
    ("scan -m /no/such/model", ["model path not found", "/no/such/model"]),
    ("scan -m ./no-such-folder", ["model path not found"]),
    ("scan -m {models}/no-config", ["no config.json", "no-config"]),
    ("scan -m {models}/opt", ["'opt'", "not in cardhouse's adapter table"]),
    # attack (fix 4: --k -1 said "k=0 is out of range"; fix 5: these were checked after the model loaded)
    ("attack nope -m M", ["unknown attack", "topk-zero"]),
    ("attack topk-zero -m M --k -1", ["--k", R, "got -1"]),
    ("attack topk-zero -m M --k 49 --context 64", ["--k", R]),
    ("attack topk-zero -m M --indices a,b --context 64", ["--indices", I, "'a,b'"]),
    ("attack topk-zero -m M --indices 3,3 --context 64", ["--indices", "without repeats", "repeated: [3]"]),
    ("attack topk-zero -m M --indices 1,48 --context 64", ["--indices", I, "out of range: 48"]),
    ("attack topk-zero -m M --layer 2 --context 64", ["--layer", L]),
    # fix 2: --context against the model's positions (SmolLM2 --context 9000 ran on; GPT-2 crashed)
    ("attack topk-zero -m M --context 256", ["--context", P, "128 positions"]),
    ("attack topk-zero -m G --context 129", ["--context", P]),
    ("attack topk-zero -m M --context 1", ["--context", P]),
    ("attack topk-zero -m M --context 64 --max-tokens 10", ["--max-tokens", ">= 63"]),
    ("attack topk-zero -m M --context 64 --task-limit 0", ["--task-limit", ">= 1"]),
    ("attack topk-zero -m M --context 64 --corpus nope", ["unknown corpus", "wikipedia"]),
    ("attack topk-zero -m M --context 64 --json out", ["--json", "a file path"]),
    # intervene
    ("intervene set-half -m M", ["unknown intervention", "set-zero"]),
    ("intervene set-zero -m M --context 256", ["--context", P]),
    ("intervene set-zero -m M --context 64 --task-limit 0", ["--task-limit", ">= 1"]),
    ("intervene set-zero -m M --context 64 --prompts {models}/latin1.txt", ["latin1.txt", "not UTF-8"]),
    # longctx and generate (issue 16)
    ("longctx -m M --n 0", ["--n", ">= 1", "got 0"]),
    ("longctx -m M --max-new-tokens 0", ["--max-new-tokens", ">= 1"]),
    ("longctx -m M --min-ratio -2", ["--min-ratio", "> 0", "got -2"]),
    ("generate -m M --relative --min-abs 5", ["ratio-only", "--min-ratio"]),
    ("longctx -m M --k 49", ["--k", R, "48 FFN neurons"]),
    # these three were refused only after the weights loaded
    ("longctx -m M --lengths 64,128", ["context length(s) [128]", "8 answer tokens", "maximum of 128"]),
    ("longctx -m M --lengths 64 --depths 0,1.5", ["depths must lie in [0, 1]", "1.5"]),
    ("longctx -m M --lengths 64 --kind haystack", ["unknown long-context task", "passkey"]),
    ("generate -m M --n 0", ["--n", ">= 1"]),
    ("generate -m M --max-new-tokens 0", ["--max-new-tokens", ">= 1"]),
    ("longctx -m M --adapter {models}/llama", ["holds no PEFT adapter", "OUT/adapter"]),
    ("generate -m M --adapter {models}/llama", ["holds no PEFT adapter", "OUT/adapter"]),
    ("generate -m M --source dolly", ["unknown generation source", "alpaca, gsm8k"]),
    ("generate -m M --source triviaqa", ["unknown generation source", "naturalqs, squad, coqa, drop, jeopardy"]),
    ("generate -m M --source naturalqs --n 1001", ["naturalqs has 1000 records", "asked for 1001"]),
    # sweep (fix 1's --ks 2,2 is in test_sweep_resume.py: it is deduplicated, not refused)
    ("sweep -m M --ks 49 --context 64", ["--ks", f"0..{D_MLP}", "out of range: 49"]),
    ("sweep -m M --ks -1 --context 64", ["--ks", f"0..{D_MLP}"]),
    ("sweep -m M --ks 1,x --context 64", ["--ks", f"0..{D_MLP}"]),
    ("sweep -m M --layer 2 --context 64", ["--layer", L]),
    ("sweep -m G --context 256", ["--context", P]),
    ("sweep -m M --context 64 --max-tokens 10", ["--max-tokens", ">= 63"]),
    ("sweep -m M --context 64 -o {models}/a-file", ["--out", "a folder"]),
    # attention, trace, position
    ("attention -m M --limit 0", ["--limit", ">= 1"]),
    ("attention -m M --batch-size 0", ["--batch-size", ">= 1"]),
    ("attention -m M --map-head 4", ["--map-head", f"0..{HEADS - 1}", "4 attention heads"]),
    ("attention -m M --map-layer 2", ["--map-layer", L]),
    ("attention -m M --limit 4 --prompt-index 4", ["--prompt-index", "0..3", "4 prompts"]),
    ("attention -m M --threshold 0", ["--threshold", "(0.0, 1.0]"]),
    ("attention -m M --threshold 1.5", ["--threshold", "(0.0, 1.0]"]),
    ("attention -m M --attn-implementation sdpa", ["--attn-implementation", "'eager'"]),
    ("trace -m M --k 0", ["--k", R]),
    ("trace -m M --layer 2", ["--layer", L]),
    ("trace -m M --top 0", ["--top", f"1..{D_MODEL}"]),
    ("trace -m M --top 33", ["--top", f"1..{D_MODEL}"]),
    ("trace -m M --n-prompts 0", ["--n-prompts", ">= 1"]),
    ("position -m M --prompt ''", ["--prompt", "empty"]),
    ("position -m /no/such/model", ["model path not found"]),
    # report (every model is checked before the first loads)
    ("report -m M --k 0", ["--k", R]),
    ("report -m M --attack-k 49", ["--attack-k", R]),
    ("report -m M --ks 2,49", ["--ks", f"0..{D_MLP}"]),
    ("report -m M --layer 2", ["--layer", L]),
    ("report -m M --full", ["--context", P]),  # the full mode's 512-token windows do not fit 128 positions
    ("report -m M -m G --context 256 --max-tokens 300", ["--context", P]),
    ("report -m M --context 64 --task-limit 0", ["--task-limit", ">= 1"]),
    ("report -m M --corpus nope", ["unknown corpus"]),
    ("report -m M --with nope", ["unknown extra section", "attention"]),
    ("report -m M -m /no/such/model --context 64", ["model path not found"]),
    ("report -m M --context 64 -o {models}/a-file", ["exists and is not a folder"]),
    # finetune, finetune-compare
    ("finetune -m M --context 64 --max-length 64 --batch-size 0", ["--batch-size", ">= 1"]),
    ("finetune -m M --context 64 --max-length 64 --grad-accum 0", ["--grad-accum", ">= 1"]),
    ("finetune -m M --context 64 --max-length 64 --lr 0", ["--lr", "> 0"]),
    ("finetune -m M --context 64 --max-length 64 --epochs 0", ["--epochs", "> 0"]),
    ("finetune -m M --context 64 --max-length 64 --rank 0", ["--rank", ">= 1"]),
    ("finetune -m M --context 64 --max-length 256", ["--max-length", P]),
    ("finetune -m M --context 64 --max-length 64 --records 1", ["--records", ">= 2"]),
    ("finetune -m M --context 64 --max-length 64 --max-steps 0", ["--max-steps", ">= 1 or -1"]),
    ("finetune -m M --context 64 --max-length 64 --save-steps 0", ["--save-steps", ">= 1"]),
    ("finetune -m M --context 64 --max-length 64 --p0 1.5", ["--p0", "0.0..1.0"]),
    ("finetune -m M --context 64 --max-length 64 --k 0", ["--k", R]),
    ("finetune -m M --context 64 --max-length 64 --layer 2", ["--layer", L]),
    ("finetune -m M --context 64 --max-length 64 --rows 1,2", ["--rows needs --layer"]),
    ("finetune -m M --context 64 --max-length 64 --layer 0 --rows 1,48", ["--rows", I]),
    ("finetune -m M --context 256", ["--context", P]),
    ("finetune -m M --max-length 64 --context 64 --max-tokens 10", ["--max-tokens", ">= 63 or 0"]),
    ("finetune -m M --context 64 --max-length 64 --task-limit 0", ["--task-limit", ">= 1"]),
    ("finetune -m M --context 64 --max-length 64 --method qlora", ["unknown method", "lora"]),
    ("finetune -m M --context 64 --max-length 64 --schedule sometimes", ["unknown MacDrop schedule"]),
    ("finetune -m M --context 64 --max-length 64 --data missing.json", ["data file not found"]),
    ("finetune -m M --context 64 --max-length 64 -o {models}/a-file", ["--out", "a folder"]),
    ("finetune-compare -m M --context 64 --max-length 64 --methods qlora", ["unknown method"]),
    ("finetune-compare -m M --context 64 --max-length 64 --schedules sometimes", ["unknown schedule"]),
    ("finetune-compare -m M --context 64 --max-length 64 --batch-size 0", ["--batch-size", ">= 1"]),
    ("finetune-compare -m M --context 64 --max-length 64 --layer 2", ["--layer", L]),
    ("finetune-compare -m M --context 256", ["--context", P]),
    # moe (a dense model is refused from its config)
    ("moe -m M", ["model is dense", "need an MoE model"]),
    ("attack expert-topk-zero -m M --context 64", ["model is dense"]),
    ("moe -m M --collapse 0", ["--collapse", "(0, 1]"]),
    ("moe -m M --percentile 101", ["--percentile", "0..100"]),
    ("moe -m M --limit 0", ["--limit", ">= 1"]),
    ("moe -m M --layer 2", ["--layer", L]),
    ("moe -m M --json out", ["--json", "a file path"]),
    ("attack expert-topk-zero -m M --fraction 2 --context 64", ["--fraction", "0..1"]),
    ("attack expert-topk-zero -m M --k 0 --context 64", ["--k", R]),
    # precision, quantize, export
    ("precision -m M --run-dtype int3", ["unknown dtype", "float16"]),
    ("precision -m M --margin -1", ["--margin", "0.0..16.0"]),
    ("precision -m M --rescale --power -2", ["--power", "0..64"]),
    ("precision -m M --power 2", ["--power belongs to --rescale"]),
    ("precision -m {models}/bert --rescale", ["post-norm", "change the function", "refused"]),
    ("precision -m M --rescale --export {models}", ["not empty", "--force"]),
    ("precision -m M --limit 0", ["--limit", ">= 1"]),
    ("precision -m M --export out2", ["give --rescale too"]),
    ("precision -m M --context 256 --max-tokens 300", ["--context", P]),
    ("precision -m M -o {models}/a-file", ["--out", "a folder"]),
    ("quantize -m M --weights 1 --context 64", ["bit width", "2..8"]),
    ("quantize -m M --weights 4g12 --context 64", ["group size 12 does not divide", "32"]),
    ("quantize -m M --weights four --context 64", ["BITSgGROUP"]),
    ("quantize -m {models}/llama-hd10 --weights 8,4g16 --context 64",
     ["group size 16 does not divide the input width 40", "o_proj"]),
    ("quantize -m M --acts 8:channel --context 64", ["unknown activation granularity"]),
    ("quantize -m M --k 0 --context 64", ["--k", R]),
    ("quantize -m M --context 256", ["--context", P]),
    ("quantize -m M --min-ratio 0 --context 64", ["--min-ratio", "> 0"]),
    ("quantize -m M --relative --min-abs 5 --context 64", ["ratio-only", "--min-ratio"]),
    ("quantize -m M --weights 8 --task-limit 0 --context 64", ["--task-limit", ">= 1"]),
    ("quantize -m M --weights 8 --task nope --context 64", ["unknown zero-shot task"]),
    ("quantize -m M --weights 8 --acts 8:token --task arc_easy --context 64", ["--backend hflm", "cached prefix"]),
    ("export out2 -m M --intervention set-mean", ["no exact form as weights"]),
    ("export out2 -m M --attack nope", ["unknown attack", "topk-zero"]),
    ("export out2 -m M --attack topk-zero --k 49", ["--k", R]),
    ("export out2 -m M --rescale --power -1", ["--power", "0..64"]),
    ("export {models} -m M", ["not empty", "--force"]),
    ("export out2 -m M --adapter {models}/llama", ["not a PEFT adapter folder"]),
    ("export out2 -m {models}/bert --rescale", ["post-norm", "change the function"]),
    ("export out2 -m M --quantize 8:token", ["quantizing activations", "cannot be exported"]),
    ("export out2 -m M --quantize a8", ["quantizing activations", "cannot be exported"]),
    ("export out2 -m M --quantize 9", ["bit width", "2..8"]),
    ("export out2 -m M --quantize 4g0", ["group size 0", ">= 1"]),
    ("export out2 -m {models}/llama-hd10 --quantize 4g16", ["group size 16 does not divide the input width 40"]),
    ("export out2 -m M --quantize 4 --protect bos-kv", ["--protect bos-kv", "cannot be exported"]),
    ("export out2 -m M --quantize 4 --protect massive-rows --k 49", ["--k", R]),
    ("export out2 -m M --protect super-weight", ["--protect belongs to --quantize"]),
    ("export out2 -m M --attack topk-zero --min-abs -1", ["--min-abs", ">= 0"]),
    ("export out2 -m M --quantize 4 --protect super-weight --relative --min-abs 5", ["ratio-only", "--min-ratio"]),
    ("export out2 -m M --attack expert-ablate", ["reroutes the router", "no exact form as weights"]),
    ("export out2 -m M --attack expert-topk-zero", ["model is dense"]),
    # super-weight
    ("super-weight -m M --ratio 1", ["--ratio", "> 1.0"]),
    ("super-weight -m M --top 0 --context 64", ["--top", R]),
    ("super-weight -m M --candidates 0", ["--candidates", ">= 1"]),
    ("super-weight -m M --pairs 1", ["--pairs", ">= 2 or 0"]),
    ("super-weight -m M --pairs 9 --context 64", ["more than the budget", "--max-pairs"]),
    ("super-weight -m M --weight 1:2", ["--weight", "LAYER:ROW:COLUMN"]),
    ("super-weight -m M --weight 5:0:0 --context 64", ["layer 5 is out of range"]),
    ("super-weight -m M --weight 0:32:0 --context 64", ["W_down row 32 is out of range", "0..31"]),
    ("super-weight -m M --context 256", ["--context", P]),
    # emergence (trains from scratch: no pretrained weights either way) and download
    ("emergence --steps 0", ["--steps", ">= 1"]),
    ("emergence --batch-size 0", ["--batch-size", ">= 1"]),
    ("emergence --n-head 3", ["head count", "divide"]),
    ("emergence --variants standard,nope", ["unknown variant"]),
    ("emergence --config tpu", ["unknown config"]),
    ("emergence --corpora nope", ["unknown corpus"]),
    ("emergence -o {models}/a-file", ["--out", "a folder"]),
    ("download no-such-model", ["unknown bundled model", "smollm2-135m"]),
    # encoder: the kind of input the model reads, and its own ranges
    ("encoder -m M --images builtin", ["decoder LM", "cardhouse scan"]),
    ("encoder -m M --images builtin --copies 9", ["--copies", "1..5"]),
    ("encoder -m M --sentences builtin --mrpc-pairs 0", ["--mrpc-pairs", ">= 1"]),
    ("encoder -m M", ["give --images"]),
]


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("line, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_before_any_weights_load(line, words, models, no_weights, tmp_path,
                                                             monkeypatch):
    import shlex

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()  # an existing folder, for "--json out"
    before = _files(tmp_path)
    args = [a.replace("{models}", str(models)) for a in shlex.split(line)]
    args = [str(models / "llama") if a == "M" else str(models / "gpt2") if a == "G" else a for a in args]
    result = runner.invoke(app, args)
    output = result.output
    assert result.exit_code == 1, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught exception
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert _files(tmp_path) == before  # nothing written, not even an empty output folder


@pytest.mark.parametrize("args, words", [
    (["scan", "--limit", "abc"], ["Invalid value", "--limit"]),
    (["attack", "topk-zero", "--k", "2.5"], ["Invalid value", "--k"]),
    (["scan", "--no-such-option"], ["No such option", "--no-such-option"]),
])
def test_what_the_parser_cannot_read_is_a_usage_error(args, words, no_weights, tmp_path, monkeypatch):
    """A value of the wrong type or an unknown option never reaches cardhouse's checks: click answers with its
    usage line and exit code 2 (README, "What happens on bad input"), still before any weights load."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, (word, result.output)
    assert _files(tmp_path) == set()


def test_every_command_is_in_the_table():
    """A new command joins the table (and so the validation layer) or this test fails."""
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    tested = {line.split()[0] for line, _ in CASES}
    assert names - tested <= {"models"}, names - tested  # `models` takes no input


def test_every_numeric_option_has_a_validation_rule():
    """Every int or float option of every command is checked by a rule in ``cardhouse.validation.RULES``
    (the seeds take any integer)."""
    import inspect
    import typing

    from typer.models import OptionInfo

    flags = {rule.flag for rule in RULES.values()}
    missing, seen = [], 0
    for command in app.registered_commands:
        hints = typing.get_type_hints(command.callback)
        for name, param in inspect.signature(command.callback).parameters.items():
            kind = hints[name]
            if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            info = param.default
            if kind not in (int, float) or not isinstance(info, OptionInfo):
                continue
            flag = next((d for d in info.param_decls or () if d.startswith("--")), "--" + name.replace("_", "-"))
            seen += 1
            if flag not in flags and flag != "--seed":
                missing.append(f"{command.name or command.callback.__name__} {flag}")
    assert seen > 40 and not missing, (seen, missing)


def test_unsupported_family_is_refused_from_the_config_alone(models, no_weights):
    from cardhouse.models import load_model
    from cardhouse.models.adapters import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="'opt'"):
        load_model(str(models / "opt"))  # only config.json is there: no weights could have been read


@pytest.mark.parametrize("source, message", [("/no/such/model", "model path not found"),
                                             ("no/such/deep/path", "model path not found"),
                                             ("nobody/no-such-model", "not a bundled model")])
def test_a_model_that_is_not_there_says_so(source, message, no_weights):
    from cardhouse.models import load_model
    from cardhouse.models.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match=message):
        load_model(source)


def test_the_api_checks_context_against_the_model(tiny):
    from cardhouse.evaluation.measure import Budget, measurer

    with pytest.raises(ValueError, match=f"--context must be an integer in {P}"):
        measurer(tiny("llama"), Budget(max_tokens=300, context=CONTEXT + 1))


def test_the_report_checks_every_model_before_loading_any(models, no_weights, tmp_path):
    from cardhouse.reports.report import Settings, build_report
    from cardhouse.validation import OptionError

    with pytest.raises(OptionError, match="--layer must be an integer in 0..1"):
        build_report([str(models / "llama"), str(models / "gpt2")], tmp_path / "report", Settings.quick(layer=5),
                     progress=False)
    assert not (tmp_path / "report").exists()


def test_a_checked_model_still_runs(models, tmp_path, monkeypatch):
    """The same table's good neighbour: valid options on the same tiny model run to the end."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["scan", "-m", str(models / "llama"), "--limit", "4", "--k", "48", "--layer", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cardhouse-out" / "scan.json").is_file()
    assert os.path.getsize(tmp_path / "cardhouse-out" / "scan.json") > 0
