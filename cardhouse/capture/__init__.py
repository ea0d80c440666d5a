from .hooks import POINTS, all_hook_names, hook_name, hooks, parse_hook_name, record
from .attention import POINTS as ATTENTION_POINTS
from .moe import POINTS as MOE_POINTS
from .stats import LayerStats, StreamingStats
from .batches import PromptBatch, batches
from .run import run_batches, run_inputs, tokenize_prompts
from .inputs import Inputs
from .reuse import PrefixCache, reuse_prefix
