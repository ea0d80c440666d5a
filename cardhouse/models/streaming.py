"""Layer streaming: checkpoints larger than memory, one decoder block at a time.

The model is built as a skeleton on the meta device (accelerate's ``init_empty_weights``; buffers
such as rotary frequencies are computed for real). What every pass needs outside the decoder
blocks (the final norm, position tables) is loaded once; the token embedding is read while the
states entering block 0 are computed and the head while the logits are, then both are freed (with
a large vocabulary they outweigh a block); block l is read from the checkpoint (the byte range of
each tensor, shard by shard through the index JSON), run over *every* batch, and freed before
block l + 1 is read. Peak memory is about one block (or the embedding, or the head), the rest and
the hidden states of all batches (kept in the model dtype, or spilled to a memmap:
``models.spill``). Freed blocks go back to the operating system: glibc would otherwise keep
block-sized chunks in its heap once its adaptive mmap threshold has grown past them
(``_release_large_frees``).

Variants of one model share what they do not change. ``editing(layer, apply)`` makes a weight edit
to block ``layer`` each time that block is loaded; ``share_prefix(layer)`` keeps the hidden states
entering ``layer`` for each input set, so the blocks before it run once for every variant (what
``capture.reuse.reuse_prefix`` does for a model in memory; it hands a streamed model to this one).

The model's own forward does the work, so every family's masks, rotary embeddings and scalings
are computed as usual: while block l is loaded, the other blocks pass their input through, block
l's input is replaced by the hidden state stored for the batch, and its output is stored and the
pass stopped (the stored states also stand in for the embedding's output, ``inputs_embeds``, so
the embedding stays unloaded). The head pass replaces the final norm's input the same way and
returns the logits.
Hooks named ``blocks.{l}.*`` (attached by the caller, ``capture.run``) fire while block l runs.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .adapters import Blocks, get
from .conversion import converted
from .gguf_files import GGUFTensors, gguf_config
from .skipping import skip_blocks
from .spill import HiddenStates


class _Stop(Exception):
    """Ends a forward pass once the block being streamed has produced its output."""


class CheckpointReader:
    """Tensors of a Hugging Face safetensors checkpoint folder, one at a time (single file or shards)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            weight_map = {k: "model.safetensors" for k in _header(self.folder / "model.safetensors")}
        else:
            raise FileNotFoundError(f"{self.folder} has no model.safetensors or model.safetensors.index.json: "
                                    "--stream reads safetensors checkpoints and GGUF files")
        missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise FileNotFoundError(f"the checkpoint index names shards that are missing from {self.folder}: "
                                    f"{', '.join(missing)}")
        self.weight_map: dict[str, str] = weight_map
        self._headers: dict[str, tuple[int, dict]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, read from its byte range of the shard (no memory map: mapped pages that were
        read would count as resident memory, up to the whole checkpoint). ``out``: a tensor of its shape
        to fill and return (the previous block's: its pages are already mapped, and faulting in fresh
        ones costs more than reading), read into directly when it has the stored dtype on the CPU."""
        file = self.weight_map[name]
        if file not in self._headers:
            self._headers[file] = _header_with_offset(self.folder / file)
        start, header = self._headers[file]
        info = header[name]
        begin, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{name} in {file} has dtype {info['dtype']}, which cardhouse cannot read")
        direct = (out is not None and out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
                  and list(out.shape) == list(info["shape"]))
        if end == begin:
            value = torch.empty(info["shape"], dtype=dtype)
            return value if out is None else out.copy_(value)
        # not zero-filled first (a bytearray is): read once
        data = out.view(-1).view(torch.uint8) if direct else torch.empty(end - begin, dtype=torch.uint8)
        with open(self.folder / file, "rb") as f:
            f.seek(start + begin)
            f.readinto(memoryview(data.numpy()))
        if direct:
            return out
        value = data.view(dtype).reshape(info["shape"])
        return value if out is None else out.copy_(value)

    def close(self) -> None:
        self._headers.clear()


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header_with_offset(path: Path) -> tuple[int, dict]:
    """The safetensors header (name -> dtype, shape, data_offsets) and where the data starts."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def _header(path: Path) -> dict:
    return _header_with_offset(path)[1]


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter ``name`` of ``module`` (meta or real) by ``value``."""
    owner, _, leaf = name.rpartition(".")
    target = get(module, owner) if owner else module
    target._parameters[leaf] = nn.Parameter(value, requires_grad=False)


@dataclass
class SharedPrefix:
    """The hidden states entering ``layer``, by input set; ``hits`` and ``misses`` count the runs."""

    layer: int
    states: dict[bytes, HiddenStates] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    block: dict[str, torch.Tensor] | None = None  # block ``layer``'s tensors, kept for the next variant


def _inputs_key(batches: Sequence[dict]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for batch in batches:
        for name in sorted(batch):
            value = batch[name]
            if isinstance(value, torch.Tensor):
                h.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
                h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


@dataclass
class Streamer:
    """A skeleton model and the checkpoint its blocks are read from."""

    model: nn.Module
    reader: CheckpointReader
    dtype: torch.dtype
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tuple_output: bool = False  # older decoder layers return (hidden_states, ...)
    loaded: int | None = None  # the block in memory
    edits: dict[int, list[Callable[[], object]]] = field(default_factory=dict)  # layer -> edits made on load
    prefix: SharedPrefix | None = None
    spare: dict[str, torch.Tensor] = field(default_factory=dict)  # the last freed block's tensors, by name in it

    @property
    def blocks(self) -> Blocks:
        return Blocks.of(self.model)

    def block_prefix(self, layer: int) -> str:
        return f"{self.blocks.adapter.layers}.{layer}."

    def check(self) -> None:
        """Every parameter the config asks for is in the checkpoint (a clear error before any compute)."""
        alias = self._tied()
        missing = [n for n, _ in self.model.named_parameters(remove_duplicate=False)
                   if n not in self.reader and alias.get(n) not in self.reader]
        if missing:
            raise FileNotFoundError(f"the checkpoint in {self.reader.folder} lacks {len(missing)} tensors the "
                                    f"config needs (config/checkpoint mismatch?): {', '.join(missing[:5])}"
                                    + (" ..." if len(missing) > 5 else ""))

    def _tied(self) -> dict[str, str]:
        """Tied input and output embeddings: each name -> the other (a checkpoint stores one of them)."""
        head, embed = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head is None or not getattr(self.model.config, "tie_word_embeddings", False):
            return {}
        names = {m: n + ".weight" for n, m in self.model.named_modules() if m is head or m is embed}
        return {names[head]: names[embed], names[embed]: names[head]} if len(names) == 2 else {}

    def _ends(self) -> dict[str, nn.Module]:
        """The token embedding and the output head: read only while a pass needs them."""
        ends = {"embeddings": self.model.get_input_embeddings(), "head": self.model.get_output_embeddings()}
        return {k: m for k, m in ends.items() if m is not None}

    def load_rest(self) -> None:
        """Load every parameter outside the decoder blocks but the embedding's and the head's (``resident``)."""
        prefix = self.blocks.adapter.layers + "."
        later = {id(p) for m in self._ends().values() for p in m.parameters()}
        for name, param in list(self.model.named_parameters(remove_duplicate=False)):
            if not name.startswith(prefix) and id(param) not in later:
                _set(self.model, name, self.reader.tensor(self._stored(name)).to(self.device, self.dtype))
        self.reader.close()

    def _stored(self, name: str) -> str:
        """The checkpoint's name for parameter ``name`` (a tied head is stored as the embedding, or back)."""
        return name if name in self.reader else self._tied()[name]

    @contextmanager
    def resident(self, part: str) -> Iterator[nn.Module]:
        """The token embedding (``"embeddings"``) or the head (``"head"``) read for the duration, then freed;
        already in memory (an outer ``resident``): left as it is."""
        module = self._ends()[part]
        params = list(module.named_parameters())
        if not any(p.is_meta for _, p in params):
            yield module
            return
        self.spare.clear()  # the embedding or head (larger than a block with a large vocabulary) in its place
        _trim()
        try:
            self._read_end(part)
            yield module
        finally:
            for name, param in params:
                _set(module, name, torch.empty_like(param, device="meta"))
            _trim()

    def _read_end(self, part: str) -> None:
        module = self._ends()[part]
        owner = next(n for n, m in self.model.named_modules() if m is module)
        for name, _ in list(module.named_parameters()):
            full = f"{owner}.{name}" if owner else name
            _set(module, name, self.reader.tensor(self._stored(full)).to(self.device, self.dtype))
        self.reader.close()

    def _read(self, layer: int) -> None:
        """Block ``layer``'s parameters from the checkpoint, in the streamer's dtype and device, into the
        previous block's tensors where they fit (the blocks of a model mostly share their shapes: reading
        into memory already mapped is several times faster than into fresh pages, and nothing is zeroed).
        The tensors are ordinary ones, not inference tensors, so a block read under ``inference_mode`` can
        be reused (and edited) outside it."""
        module, prefix = self.blocks.layers[layer], self.block_prefix(layer)
        spare, self.spare = self.spare, {}
        with torch.inference_mode(False):
            for name, param in list(module.named_parameters()):
                out = spare.pop(name, None)
                if out is not None and (out.shape, out.dtype, out.device) == (param.shape, self.dtype, self.device):
                    _set(module, name, self.reader.tensor(prefix + name, out=out))
                else:
                    _set(module, name, self.reader.tensor(prefix + name).to(self.device, self.dtype))
        self.reader.close()

    def materialize(self) -> nn.Module:
        """The whole model in memory, every block read for good (an ordinary load through this reader:
        a split GGUF, which transformers does not read)."""
        for layer in range(len(self.blocks)):
            self._read(layer)
        for part in self._ends():
            self._read_end(part)
        if self._tied():
            self.model.tie_weights()
        del self.model._cardhouse_streamer
        return self.model

    @contextmanager
    def block(self, layer: int) -> Iterator[nn.Module]:
        """Block ``layer`` read from the checkpoint for the duration, then freed (back to meta; its tensors
        kept as ``spare`` for the next block to be read into). Inside ``share_prefix(layer)`` the block
        starting the shared prefix is read once and kept for every variant: each variant's edit restores
        it bit-identically on exit (``overwrite_slices``)."""
        module = self.blocks.layers[layer]
        shared = self.prefix if self.prefix is not None and self.prefix.layer == layer else None
        kept = shared is not None and shared.block is not None
        ok = False
        try:
            if kept:
                for name, value in shared.block.items():
                    _set(module, name, value)
            else:
                self._read(layer)
            self.loaded = layer
            with ExitStack() as edits:
                for apply in self.edits.get(layer, ()):
                    edits.enter_context(apply())
                yield module
            ok = True
        finally:
            self.loaded = None
            tensors = {name: param.detach() for name, param in module.named_parameters() if not param.is_meta}
            for name, param in list(module.named_parameters()):
                _set(module, name, torch.empty_like(param, device="meta"))
            if shared is not None:  # kept unless the edits' exit failed: their restore is what keeps it intact
                shared.block = tensors if ok else None
            else:
                self.spare = tensors
            _trim()

    @contextmanager
    def editing(self, layer: int, apply: Callable[[], object]) -> Iterator[None]:
        """Within the context, ``apply()`` (a weight edit of block ``layer``, restoring on exit) is entered
        each time block ``layer`` is loaded, and left before the block is freed."""
        self.blocks.check_layer(layer)
        if self.prefix is not None and layer < self.prefix.layer:
            raise ValueError(f"an edit of layer {layer} inside share_prefix({self.prefix.layer}): the shared states "
                             "entering that layer would not see it")
        self.edits.setdefault(layer, []).append(apply)
        try:
            yield
        finally:
            self.edits[layer].remove(apply)

    @contextmanager
    def share_prefix(self, layer: int) -> Iterator[SharedPrefix]:
        """Within the context, the first run over a set of inputs keeps the hidden states entering block
        ``layer``; later runs over the same inputs start there. Edits of earlier layers are refused."""
        self.blocks.check_layer(layer)
        early = [l for l, applies in self.edits.items() if applies and l < layer]
        if early:
            raise ValueError(f"share_prefix({layer}) with edits of layers {early} in effect")
        outer, self.prefix = self.prefix, SharedPrefix(layer)
        try:
            yield self.prefix
        finally:
            self.prefix.block = None  # the kept block is freed with the context (a caller may keep the counts)
            self.prefix = outer

    # ---- forward passes ---------------------------------------------------------------------------

    @contextmanager
    def _only(self, layer: int | None) -> Iterator[None]:
        """Every block but ``layer`` passes its input through (None: all of them): ``models.skipping``."""
        skipped = [j for j in range(len(self.blocks)) if j != layer]
        with skip_blocks(self.blocks.layers, skipped, tuple_output=self.tuple_output):
            yield

    def run_embeddings(self, batch: dict) -> torch.Tensor:
        """The hidden states entering block 0 for one batch (the embedding resident: ``resident``)."""
        out: dict = {}

        def grab(mod, args, kwargs):
            out["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        with self._only(None), ExitStack() as stack:
            stack.callback(self.blocks.layers[0].register_forward_pre_hook(grab, with_kwargs=True, prepend=True).remove)
            try:
                self.model.base_model(**batch, use_cache=False)
            except _Stop:
                pass
        return out["h"]

    @staticmethod
    def _without_ids(batch: dict, state: torch.Tensor) -> dict:
        """The batch with ``state`` in place of the token ids: the model's masks and positions come out the
        same, and the (unloaded) embedding is not called."""
        return {**{k: v for k, v in batch.items() if k != "input_ids"}, "inputs_embeds": state, "use_cache": False}

    def run_block(self, layer: int, batch: dict, state: torch.Tensor, hooks=None) -> torch.Tensor:
        """The hidden states leaving block ``layer`` (loaded) for one batch whose states entering it are
        ``state``. ``hooks``: a context manager that attaches the caller's hooks on that block
        (``capture.hooks``), entered around the pass."""
        module = self.blocks.layers[layer]
        out: dict = {}

        def inject(mod, args, kwargs):
            return ((state,) + args[1:], kwargs) if args else (args, {**kwargs, "hidden_states": state})

        def stop(mod, args, output):
            self.tuple_output = isinstance(output, tuple)
            out["h"] = output[0] if isinstance(output, tuple) else output
            raise _Stop

        with self._only(layer), (hooks if hooks is not None else nullcontext()), ExitStack() as stack:
            stack.callback(module.register_forward_pre_hook(inject, with_kwargs=True, prepend=True).remove)
            stack.callback(module.register_forward_hook(stop).remove)  # after the named hooks
            try:
                self.model.base_model(**self._without_ids(batch, state))
            except _Stop:
                pass
        return out["h"]

    def run_head(self, batch: dict, state: torch.Tensor) -> torch.Tensor:
        """The logits from the hidden states leaving the last block (reads the head unless it is resident)."""
        norm = get(self.model, self.blocks.adapter.final_norm)

        def inject(mod, args, kwargs):
            return ((state,) + args[1:], kwargs) if args else (args, {**kwargs, "hidden_states": state})

        with self.resident("head"), self._only(None), ExitStack() as stack:
            stack.callback(norm.register_forward_pre_hook(inject, with_kwargs=True).remove)
            return self.model(**self._without_ids(batch, state)).logits

    def fingerprint(self) -> str:
        """Names, sizes and modification times of the checkpoint's files: what a resumed run checks
        instead of hashing every weight (which would mean reading the whole checkpoint)."""
        root = Path(self.reader.folder)
        files = sorted(root.iterdir()) if root.is_dir() else [Path(f) for f in getattr(self.reader, "parts", [root])]
        h = hashlib.sha256()
        for file in files:
            stat = file.stat()
            h.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return h.hexdigest()

    def states_for(self, batches: Sequence[dict]) -> HiddenStates:
        """An empty store for the hidden states of ``batches`` (in memory, or spilled: ``models.spill``)."""
        width = self.model.config.hidden_size
        return HiddenStates([(*batch["input_ids"].shape, width) for batch in batches], self.dtype, self.device)

    def run(self, batches: Sequence[dict], *, hooks_for: Callable[[int, int], object] | None = None,
            start: int = 0, states: HiddenStates | None = None, stop: int | None = None,
            edit: Callable[[int], object] | None = None, progress: bool = True) -> HiddenStates:
        """Run ``batches`` through blocks ``start``..``stop - 1``, block-major: each block is read once.

        ``states``: the hidden states entering block ``start`` (None: from the embeddings), left intact;
        ``hooks_for(layer, batch index)``: a context manager attaching hooks, or None; ``edit(layer)``: a
        context manager applied while that block is loaded (a weight attack edits the block as it is
        loaded; inside ``share_prefix(l)`` only for layers from l on). Inside ``share_prefix(l)`` a run from
        the embeddings without hooks starts at block l from the kept states when it has seen these inputs. Returns the states leaving the last block run.
        """
        from tqdm.auto import tqdm

        stop = len(self.blocks) if stop is None else stop
        shared = self.prefix
        if shared is not None and start == 0 and states is None and hooks_for is None and 0 < shared.layer <= stop:
            key = _inputs_key(batches)
            if key in shared.states:
                shared.hits += 1
            else:
                shared.misses += 1
                self.prefix = None  # the run up to the shared layer is an ordinary one
                try:
                    shared.states[key] = self.run(batches, stop=shared.layer, progress=progress)
                finally:
                    self.prefix = shared
            start, states = shared.layer, shared.states[key]
        if states is not None:
            states = states.copy()
        else:
            if start != 0:
                raise ValueError(f"a run from block {start} needs the states entering it")
            states = self.states_for(batches)
            with torch.inference_mode(), self.resident("embeddings"):
                for i, batch in enumerate(batches):
                    states[i] = self.run_embeddings(batch)
        with torch.inference_mode():
            for layer in tqdm(range(start, stop), desc="blocks", unit="block", disable=not progress, leave=False):
                with self.block(layer), (edit(layer) if edit else nullcontext()):
                    for i, batch in enumerate(batches):
                        states[i] = self.run_block(layer, batch, states[i], hooks_for(layer, i) if hooks_for else None)
        return states


def _libc():
    """The C library when it is glibc (Linux), else None: its allocator keeps freed memory that the
    functions below give back; other C libraries have their own policy."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _libc()


def _release_large_frees() -> None:
    """Serve large allocations (block tensors, activations) by mmap, so that freeing one gives it back.

    By default glibc raises its mmap threshold to the size of each mmapped chunk that is freed (up to
    32 MiB), so after the first block every tensor of a block comes from the heap, whose freed space
    is kept: resident memory then grows block after block. A fixed threshold turns that off."""
    if _LIBC is not None:
        _LIBC.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD


def _trim() -> None:
    """Give the heap's free pages back to the system (the small allocations a pass leaves scattered
    through it keep it from shrinking otherwise): after each block, a few milliseconds."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def stream_skeleton(source: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu",
                    config=None) -> Streamer:
    """The meta-device skeleton of the checkpoint at ``source`` (a safetensors folder, or a GGUF file,
    single or split) with its non-block modules loaded. ``config``: the checkpoint's, when known."""
    import accelerate
    from transformers import AutoConfig, AutoModelForCausalLM

    source = Path(source)
    gguf = source.suffix == ".gguf" or source.is_file()
    if config is None:
        config = gguf_config(source) if gguf else AutoConfig.from_pretrained(source)
    with accelerate.init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    reader = GGUFTensors(source, model) if gguf else converted(CheckpointReader(source), model)
    streamer = Streamer(model.eval(), reader, dtype, torch.device(device))
    streamer.check()
    _release_large_frees()
    streamer.load_rest()
    model._cardhouse_streamer = streamer  # perplexity and run_batches find it here
    return streamer


def streamer_of(model: nn.Module) -> Streamer | None:
    return getattr(model, "_cardhouse_streamer", None)


def block_bytes(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of the largest decoder block, bytes of everything else) in ``dtype``."""
    blocks = Blocks.of(model)
    size = torch.tensor([], dtype=dtype).element_size()
    largest = max(sum(p.numel() for p in block.parameters()) for block in blocks.layers) * size
    total = sum(p.numel() for p in model.parameters()) * size
    return largest, total - sum(p.numel() for p in blocks.layers.parameters()) * size


__all__ = ["CheckpointReader", "SharedPrefix", "Streamer", "block_bytes", "stream_skeleton", "streamer_of"]
