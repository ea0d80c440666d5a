from .criterion import Criterion
from .massive_activations import ActivationOverflow, ScanResult, scan
from .prompts import builtin_prompts, load_prompts
from .massive_weights import MassiveWeights, find_massive_weights
from .moe import MoEAnalysis, analyze_moe
from .super_weight import SuperWeight, SuperWeightScan, find_super_weights
