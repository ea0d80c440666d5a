from .massive_activations import Criterion, ScanResult, scan
from .prompts import builtin_prompts, load_prompts
