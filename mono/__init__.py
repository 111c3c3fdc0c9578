"""mono: Towards Monosemanticity (Bricken et al. 2023) on Ray.

Stages, each a `run(cfg)` over a `mono.config.Config`:
1 `tokens` corpus (`corpus`) -> token shards; 2 `train_lm` one-layer transformer; 3 `acts` MLP
activation shards; 4 `sweep` SAE grid (`sae`, `train_sae`, `metrics`, `pack`, `resample`,
`trial`); 5 `features` + `pages` feature browser; 6 `splitting` + `family_pages` features
matched across dictionary sizes. Importing mono needs neither a Ray cluster nor a GPU.
"""

from mono.config import PRESETS, Config, preset

__all__ = ["PRESETS", "Config", "preset"]
