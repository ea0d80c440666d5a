from .activations import massive_means, set_activations
from .variants import ATTACKS, CONTROL, INTERVENTIONS, Variant, attack, intervention, original, run_variants
from .weights import (check_indices, overwrite_slices, random_indices, retain_rows, touched_tensors,
                      weights_digest, zero_rows, zero_super_weight)
from .experts import MOE_ATTACKS, ExpertTarget, expert_attack, moe_variants, prune_experts, route_around
