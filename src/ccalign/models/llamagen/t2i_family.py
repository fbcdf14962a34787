"""LlamaGen's text-to-image GPTs as a model family: caption conditions, the released T2I files
(peizesun/llamagen_t2i), specs, the shared next-token sampler. What it shares with the
class-conditional family (tokenizer, sampler, memory estimate) it inherits from it."""

from __future__ import annotations

from torch import nn

from ccalign import hub
from ccalign.conditions import Captions
from ccalign.io import PathLike, read_tensor_file
from ccalign.models.family import ModelSpec, keep_float64, official_keys
from ccalign.models.llamagen.family import IGNORED_KEYS, LlamaGenFamily
from ccalign.models.llamagen.t2i import LlamaGenT2I, LlamaGenT2IConfig
from ccalign.weights import extract_state_dict, load_weights

#: a key only the T2I files hold: the caption projection
MARKER = "cls_embedding.cap_proj.fc1.weight"
#: the sampling options of the class-conditional family that captions keep (not GFT's beta)
_SHARED_OPTIONS = ("--grid", "--temperature", "--cfg-interval", "--compile", "--no-cuda-graph")


class LlamaGenT2IFamily(LlamaGenFamily):
    """LlamaGen T2I GPTs (the released XL at 256 and 512 px, any LlamaGen size of your own)."""

    name = "llamagen-t2i"
    title = "LlamaGen T2I"
    default_preset = "GPT-XL"  # the released T2I models' size
    text_encoder = "google/flan-t5-xl"  # the encoder of its captions (LlamaGen's language/t5.py)
    model_class = LlamaGenT2I
    config_class = LlamaGenT2IConfig
    capabilities = frozenset()
    lacks = {
        **LlamaGenFamily.lacks,
        "beta_embedding": "GFT's beta embedding belongs to the class-conditional LlamaGen",
    }
    sampling_options = tuple(
        option for option in LlamaGenFamily.sampling_options if option.flags[0] in _SHARED_OPTIONS
    )

    def recognizes(self, path: PathLike) -> bool:
        return self.config_from_file(path) is not None or MARKER in official_keys(path)

    def load(self, spec: ModelSpec, *, codec=None) -> LlamaGenT2I:
        """The model of ``spec.init``: a ccalign file carries its architecture, a registry name
        supplies it; other official files need the preset and the grid. Loaded strictly."""
        path = hub.resolve(spec.init, kind="model")
        if self.config_from_file(path) is not None:
            return super(LlamaGenFamily, self).load(ModelSpec(init=str(path), arch=spec.arch))
        model = self.build(spec)
        weights = extract_state_dict(read_tensor_file(path))
        return load_weights(keep_float64(model, weights), weights, ignore=IGNORED_KEYS)

    def condition(self, model: nn.Module) -> Captions:
        return model.condition_kind

    def describe(self, model: nn.Module) -> str:
        rows, width = model.config.grid, model.config.width
        return f"grid {rows}" if rows == width else f"grid {rows}x{width}"


FAMILY = LlamaGenT2IFamily()
