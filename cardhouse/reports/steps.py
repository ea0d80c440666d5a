"""The report's steps in page order: ``STEPS`` (always run), ``ENCODER_STEPS`` (an encoder's page) and
``OPTIONAL_STEPS`` (run when asked for by name: ``--with NAME``).

Adding a section (for instance one for another analysis) is one function ``run(ctx) -> Section``
and one entry here.
"""

from __future__ import annotations

from ..models.loading import BUNDLED, LoadedModel
from .activations_section import activations_step, scan_step
from .attention_section import attention_step
from .context import Step
from .encoder_section import encoder_step
from .macdrop_section import macdrop_step
from .model_section import inputs_step, model_step
from .moe_section import is_moe, moe_step
from .weights_section import attacks_step, weights_step

STEPS: list[Step] = [
    Step("model", "Model", model_step),
    Step("inputs", "Prompts and corpora", inputs_step),
    Step("scan", "Magnitudes per layer (Sun et al. Table 1)", scan_step),
    Step("activations", "Massive activations: dims, layers, tokens", activations_step),
    Step("weights", "Massive weights (House of Cards)", weights_step),
    Step("attacks", "Attacks on the massive weights (House of Cards Fig. 4)", attacks_step),
    Step("moe", "Mixture of Experts: router collapse, the carrier's expert, super experts (House of Cards Fig. 5)",
         moe_step, applies=is_moe),
]

# An encoder (vision transformer, sentence encoder) gets its own sections: no corpora, no perplexity.
ENCODER_STEPS: list[Step] = [
    Step("model", "Model", model_step),
    Step("encoder", "Encoder: the carrying token, its weights, interventions, norm map, registers", encoder_step),
]


def is_encoder(source: str | LoadedModel) -> bool:
    if isinstance(source, LoadedModel):
        return source.inputs != "causal"
    return source in BUNDLED and BUNDLED[source].inputs != "causal"


# Sections run only when asked for by name (``Settings.extras``, ``cardhouse report --with NAME``).
OPTIONAL_STEPS: dict[str, Step] = {
    "attention": Step("attention", "Attention sinks and the implicit bias (Sun et al. Sec. 4)", attention_step),
    "macdrop": Step("macdrop", "MacDrop: fine-tuning that protects the massive weights (House of Cards Table 4)",
                    macdrop_step),  # needs Settings.macdrop
}
