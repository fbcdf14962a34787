"""LlamaGen's text-to-image GPTs as a model family: caption conditions, the released T2I files
(peizesun/llamagen_t2i), specs, the shared next-token sampler. What it shares with the
class-conditional family (tokenizer, sampler, memory estimate) it inherits from it."""

from __future__ import annotations

from torch import nn

from ccalign import hub
from ccalign.conditions import Captions
from ccalign.io import PathLike, read_tensor_file
from ccalign.models.family import (
    ModelSpec,
    keep_float64,
    local_file,
    official_keys,
    spec_release,
    unrecorded_architecture,
)
from ccalign.models.llamagen.family import DEFAULT_GRID, IGNORED_KEYS, LlamaGenFamily
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

    def config_for(self, spec: ModelSpec) -> LlamaGenT2IConfig:
        """A ccalign file's recorded config, else the registry's or the spec's preset and grid;
        ``spec.arch`` overrides fields either way."""
        path = local_file(spec.init)
        recorded = self.config_from_file(path) if path is not None else None
        if recorded is not None:
            return self.make_config({**recorded.to_dict(), **spec.arch})
        name, grid = self._preset_and_grid(spec)
        if grid is None:
            raise unrecorded_architecture(
                spec.init, "pass the preset name (GPT-XL for the released models) and the grid "
                "(16 for 256 px, 32 for 512 px)"
            )
        if name != "custom" and name not in self.presets:
            raise ValueError(f"unknown LlamaGen model {name!r}; choose one of "
                             f"{sorted(self.presets)} or 'custom'")
        return self.make_config({**self.presets.get(name, {}), **spec.arch, "grid": grid})

    def build(self, spec: ModelSpec) -> LlamaGenT2I:
        return LlamaGenT2I(self.config_for(spec))

    def load(self, spec: ModelSpec, *, codec=None) -> LlamaGenT2I:
        """The model of ``spec.init``: a ccalign file carries its architecture, a registry name
        supplies it; other official files need the preset and the grid. Loaded strictly."""
        path = hub.resolve(spec.init, kind="model")
        if self.config_from_file(path) is not None:
            return super(LlamaGenFamily, self).load(ModelSpec(init=str(path), arch=spec.arch))
        model = self.build(spec)
        weights = extract_state_dict(read_tensor_file(path))
        return load_weights(keep_float64(model, weights), weights, ignore=IGNORED_KEYS)

    def _preset_and_grid(self, spec: ModelSpec) -> tuple[str, int | None]:
        release = spec_release(spec)
        if release is not None:
            return release.preset, release.grid
        return spec.preset or "GPT-XL", spec.options.get("grid", DEFAULT_GRID)

    def condition(self, model: nn.Module) -> Captions:
        return model.condition_kind


FAMILY = LlamaGenT2IFamily()
