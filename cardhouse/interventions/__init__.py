from .activations import massive_means, set_activations
from .variants import (ATTACKS, INTERVENTIONS, AttackSpec, Edit, Target, Variant, attack, control_of, get_attack,
                       intervention, original, register_attack, run_variants, sweep_attacks)
from .weights import (check_indices, overwrite_slices, random_indices, retain_rows, touched_tensors,
                      weights_digest, zero_rows, zero_super_weight)
from .experts import (EXPERT_ATTACKS, MOE_ATTACKS, ExpertAttackSpec, ExpertTarget, expert_attack, moe_variants,
                      prune_experts, register_expert_attack, route_around)
