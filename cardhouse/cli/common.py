"""What every command shares: the app, common options, clear errors and safe output files."""

from __future__ import annotations

import functools
import inspect
import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from .._install import InstallError
from ..analysis.criterion import DEFAULT_MIN_ABS, DEFAULT_MIN_RATIO, RELATIVE_MIN_RATIO
from ..models.adapters import UnsupportedModelError
from ..models.loading import BUNDLED, DEFAULT_MODEL, ModelLoadError

app = typer.Typer(help="Find, explain, attack and protect the massive activations and massive weights "
                       "of transformer models.", no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=False)
err = Console(stderr=True)

MODEL_HELP = f"bundled name ({', '.join(BUNDLED)}), local HF folder, GGUF file or hub id"
ModelOpt = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP)
PromptsOpt = typer.Option("builtin", "--prompts", "-p",
                          help="'builtin' (real sentences), a text file (one prompt per line) or corpus:NAME")
BosOpt = typer.Option(None, "--bos/--no-bos", help="put the BOS token first (default: if the tokenizer has one)")
# every option name means one thing on every command (tests/test_cli.py::test_one_meaning_per_option_name): the help
# before any parenthesis is the meaning, the parenthesis what it counts or holds on that command
OUT_HELP, JSON_HELP = "folder for the JSON and PNG outputs", "JSON results path"
OutOpt = typer.Option(Path("cardhouse-out"), "--out", "-o", help=OUT_HELP)


def out_opt(default: Path, note: str) -> typer.Option:
    return typer.Option(default, "--out", "-o", help=f"{OUT_HELP} ({note})")


def json_opt(default: str) -> typer.Option:
    """``--json``: where the results go (``default``: e.g. ``OUT/scan.json``, or where none is written)."""
    return typer.Option(None, "--json", help=f"{JSON_HELP} (default {default})")


def limit_opt(default: int | None, note: str = "") -> typer.Option:
    """``--limit``: how many of the prompts (or images, sentences) to use; zero-shot examples are --task-limit and
    fine-tuning records --records."""
    return typer.Option(default, "--limit", help=f"use only the first N prompts{note}")


def batch_size_opt(default: int | None, note: str = "prompts") -> typer.Option:
    return typer.Option(default, "--batch-size", help=f"inputs per forward pass ({note})")


SEED_HELP, LR_HELP = "random seed", "peak learning rate"
# what "massive" means, the same three options on every command that decides it (Criterion.from_options)
MinAbsOpt = typer.Option(None, "--min-abs", help=f"massive if |a| > this (default {DEFAULT_MIN_ABS:g}) ...")
MinRatioOpt = typer.Option(None, "--min-ratio", help=f"... and > this times the layer median (default "
                           f"{DEFAULT_MIN_RATIO:g}; {RELATIVE_MIN_RATIO:g} with --relative)")
RelativeOpt = typer.Option(False, "--relative", help="ratio-only criterion (|a| > min-ratio x median), for models "
                           "with smaller magnitudes")
# the massive weights and the random controls
K_MEANING = "k: the top-k massive rows of layer l"
K_HELP = f"{K_MEANING} (the BOS token's largest intermediate indices)"
KOpt = typer.Option(5, "--k", help=K_HELP)
LayerOpt = typer.Option(None, "--layer", help="layer l of the massive weights (default: detected)")
SeedOpt = typer.Option(0, "--seed", help=f"{SEED_HELP} (of the random controls, and of training)")
IndicesOpt = typer.Option(None, "--indices", help="comma-separated intermediate indices of layer l to attack "
                          "(overrides the top-k)")
ATTACK_K_HELP = "rows attacked in the attack table"
TOP_HELP = "how many to list"
N_HELP = "examples to answer"
# Mixture of Experts: Su et al.'s super-expert rule (both options)
PERCENTILE_HELP = "super experts: max |output| above this percentile of all experts' maxima"
FRACTION_HELP = "super experts: and above this fraction of the largest in their layer"
# encoder inputs
IMAGES_HELP = "'builtin' (8 real photographs), an image folder or file"
SENTENCES_HELP = "'builtin', a text file (one per line) or corpus:NAME"
# PEFT adapters (cardhouse finetune's OUT/adapter, MacDrop or not): what happens to them is the note
ADAPTER_HELP = "a PEFT adapter folder, e.g. cardhouse finetune's OUT/adapter"
# deployment precision: the function-preserving float16 rescale and the exported Hugging Face folder
RESCALE_HELP = "divide the residual stream by a power of two, function-preserving, so that every activation fits"
PowerOpt = typer.Option(None, "--power", help="the power of two of --rescale (default: chosen from the headroom)")
MarginOpt = typer.Option(2.0, "--margin", help="doublings kept free below the format's largest value (with --rescale; "
                         "precision: --run-dtype's, export: float16's)")
ForceOpt = typer.Option(False, "--force", help="write the exported model into a non-empty folder (the files an export "
                        "writes are replaced)")
PROTECT_HELP = "what quantization keeps in full precision"
# the evaluation budget; each command keeps its own default size (CorpusOpt is the same everywhere)
CORPUS_HELP, CONTEXT_HELP = "perplexity corpora, repeatable (wikipedia, c4, austen, ...)", "perplexity window length"
MAX_TOKENS_HELP, KS_HELP = "corpus tokens per corpus, the same for every variant", "comma-separated sweep k values"
CorpusOpt = typer.Option(["wikipedia"], "--corpus", "-c", help=CORPUS_HELP)
TasksOpt = typer.Option([], "--task", "-t", help="zero-shot tasks through lm-eval (repeatable)")
TaskLimitOpt = typer.Option(None, "--task-limit", help="zero-shot examples per task (default: all)")
BackendOpt = typer.Option("cardhouse", "--backend", help="zero-shot backend: cardhouse (the same numbers as lm-eval's "
                                                         "HFLM, faster) or hflm (lm-eval's own)")


def max_tokens_opt(default: int, note: str = "") -> typer.Option:
    return typer.Option(default, "--max-tokens", help=f"{MAX_TOKENS_HELP}{note}")


def context_opt(default: int) -> typer.Option:
    return typer.Option(default, "--context", help=f"{CONTEXT_HELP} (BOS first)")


def budget_from(corpus: list[str], max_tokens: int, context: int, tasks: list[str], task_limit: int | None, *,
                optional: bool = False, backend: str = "cardhouse"):
    """The evaluation budget of the options (checked now, before any model time); with ``optional``,
    ``--max-tokens 0`` means no perplexity, and no corpus and no task means no budget (None)."""
    from ..evaluation.measure import Budget

    if optional and max_tokens == 0:
        if not tasks:
            return None
        corpus = []
    return Budget(corpora=list(corpus), max_tokens=max_tokens, context=context, tasks=list(tasks), limit=task_limit,
                  backend=backend)


@contextmanager
def clear_errors():
    """Known failures end with one clear line and exit code 1, not a traceback: bad values (ValueError; IndexError
    for a layer, expert or head out of range), files (OSError: not found, not writable), models cardhouse cannot
    load or adapt, packages it cannot install."""
    try:
        yield
    except (ValueError, IndexError, OSError, ModelLoadError, UnsupportedModelError, InstallError) as e:
        # one line, never wrapped, and the message is not read as markup (it may hold "[1, 2]")
        err.print(Text.assemble(("error:", "bold red"), f" {e}"), soft_wrap=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:  # Ctrl-C: every result file is written atomically, so none is left half-written
        err.print(Text.assemble(("interrupted", "bold yellow"), ": no result file was left half-written"),
                  soft_wrap=True)
        raise typer.Exit(130)


def writable_folder(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create the output folder {path}: {e.strerror}") from e
    if not os.access(path, os.W_OK):
        raise PermissionError(f"the output folder {path} is not writable")
    return path


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    """``"1229,1487"`` -> ``[1229, 1487]`` (range and duplicate checks belong to the caller, who knows the sizes)."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None


# ---- where and how the model is loaded: the same options on every command that loads one ----------

_LOAD_OPTIONS = [  # (parameter, annotation, typer option)
    ("dtype", str, typer.Option("float32", "--dtype", help="auto (the checkpoint's own dtype on a GPU, float32 "
                                "on a CPU), float32, bfloat16 or float16", rich_help_panel="Model placement")),
    ("device", str, typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps or auto (the first GPU, else "
                                 "MPS, else the CPU)", rich_help_panel="Model placement")),
    ("device_map", Optional[str], typer.Option(None, "--device-map", help="spread the model over several GPUs, "
                                               "the CPU and the disk through accelerate: auto, balanced or "
                                               "sequential", rich_help_panel="Model placement")),
    ("max_memory", Optional[str], typer.Option(None, "--max-memory", help="memory per device for --device-map, "
                                               "e.g. 0=20GiB,1=20GiB,cpu=60GiB (the rest goes to disk), or the "
                                               "budget of --stream; the largest block must fit one device",
                                               rich_help_panel="Model placement")),
    ("offload_folder", Optional[Path], typer.Option(None, "--offload-folder", help="where --device-map keeps "
                                                    "the weights it offloads to disk",
                                                    rich_help_panel="Model placement")),
    ("stream", bool, typer.Option(False, "--stream", help="for checkpoints larger than memory: read one decoder "
                                  "block at a time from the safetensors files or the GGUF file (dequantized block by "
                                  "block; a split GGUF: any part) and run every prompt or window through "
                                  "it. Needs about one block + the embeddings and head + the hidden states (tokens x "
                                  "d_model x dtype bytes; attack, intervene and sweep keep them twice: the states "
                                  "entering the attacked layer are shared by every variant) in memory; "
                                  "`cardhouse memory MODEL --tokens N` prints the figures of a config",
                                  rich_help_panel="Model placement")),
    ("spill_dir", Optional[Path], typer.Option(None, "--spill-dir", help="with --stream: keep the hidden states in "
                                               "memory-mapped files in a temporary folder here instead of memory "
                                               "(then about one block + the embeddings and head in memory, and the "
                                               "hidden states on disk: the free disk is checked before the run "
                                               "starts); the files are removed on exit, also on Ctrl-C and errors",
                                               rich_help_panel="Model placement")),
]
_placement: ContextVar[dict] = ContextVar("cardhouse_placement", default={})
STREAMED_COMMANDS = {"scan", "attack", "intervene", "sweep", "report", "moe"}  # the commands whose every step runs block by block


def _command_name(command) -> str:
    return command.__name__.removesuffix("_cmd")  # attack_cmd is `cardhouse attack`


def _check_budget(models, placement) -> None:
    from ..models.memory import check_budget
    from ..models.spec import probe

    for model in [models] if isinstance(models, str) else models or []:
        check_budget(probe(model), placement)


def load_options(command):
    """Give ``command`` the model-placement options (``--dtype``, ``--device``, ``--device-map``,
    ``--max-memory``, ``--offload-folder``); ``load`` uses them. Bad values end with one ``error:``
    line before the command starts."""
    signature = inspect.signature(command, eval_str=True)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
             for name, annotation, option in _LOAD_OPTIONS]

    @functools.wraps(command)
    def run(*args, **kwargs):
        from ..models.placement import Placement

        from ..models.spill import spilling

        chosen = {name: kwargs.pop(name) for name, _, _ in _LOAD_OPTIONS}
        chosen["offload_folder"] = str(chosen["offload_folder"]) if chosen["offload_folder"] else None
        spill_dir = chosen.pop("spill_dir")
        with clear_errors():
            placement = Placement.of(**chosen)  # checked here, before any work
            if chosen["stream"] and chosen["device_map"]:
                raise ValueError("--stream reads one block at a time itself: it does not combine with --device-map")
            if chosen["stream"] and _command_name(command) not in STREAMED_COMMANDS:
                raise ValueError(f"--stream serves {', '.join(sorted(STREAMED_COMMANDS))} (and the Python API's "
                                 "streamed perplexity and attack variants) so far; use --device-map auto with "
                                 "--max-memory and --offload-folder for this command")
            if spill_dir is not None and not chosen["stream"]:
                raise ValueError("--spill-dir keeps the hidden states of a streamed run: it needs --stream")
            if spill_dir is not None and spill_dir.exists() and not spill_dir.is_dir():
                raise ValueError(f"--spill-dir {spill_dir} is a file, not a folder")
            if placement.max_memory:  # one block must fit the budget: checked on the config, before the command
                _check_budget(kwargs.get("model"), placement)
        token = _placement.set({**chosen, "spill_dir": spill_dir})
        try:
            with spilling(spill_dir):  # its private folder is removed on exit, also on Ctrl-C and errors
                return command(*args, **kwargs)
        finally:
            _placement.reset(token)

    run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    run.__annotations__ = {**{n: p.annotation for n, p in signature.parameters.items()},
                           **{name: annotation for name, annotation, _ in _LOAD_OPTIONS}}
    return run


def placement_options() -> dict:
    """The placement options of the command being run (``load_model`` keywords)."""
    return {k: v for k, v in _placement.get().items() if k != "spill_dir"}


def check_streamed_run(checked, tokens: int, copies: int = 2, tasks: list[str] | None = None) -> None:
    """With ``--stream``, what a streamed run cannot do and, with ``--spill-dir``, whether the disk holds the
    hidden states of ``tokens`` tokens ``copies`` times: refused now, before any model time."""
    from ..models.placement import Placement
    from ..models.spill import check_disk, hidden_bytes

    chosen = _placement.get()
    if not chosen.get("stream"):
        return
    if tasks:
        raise ValueError("--task needs whole forward passes of the model (lm-eval's zero-shot scoring): with "
                         "--stream only perplexity is measured; drop --task, or use --device-map auto")
    if chosen.get("spill_dir") is not None and checked.spec is not None:
        dtype = Placement.of(chosen["dtype"], chosen["device"]).torch_dtype()
        check_disk(chosen["spill_dir"], copies * hidden_bytes(tokens, checked.spec.d_model, dtype))


def window_tokens(max_tokens: int, context: int, corpora: int = 1) -> int:
    """Hidden-state tokens of the perplexity windows of ``corpora`` corpora (BOS included, rounded up)."""
    return corpora * (max_tokens // max(context - 1, 1) + 1) * context


def load(checked, bos: bool | None):
    """The weights of a model that ``cardhouse.validation.validate`` accepted (the only way a command gets them),
    placed as the command's placement options say."""
    from ..validation import Checked

    if not isinstance(checked, Checked):
        raise TypeError("validate the options first: load(cardhouse.validation.validate(model, ...), bos)")
    with err.status(f"loading {checked.spec.source}"):
        return checked.load(bos, **placement_options())
