"""Stage 2, merge: a validated config -> a UNet whose chosen layers are sparse MoE layers.

:mod:`.config` (the YAML schema, validated once) · :mod:`.discovery` (walk a UNet -> sites) ·
:mod:`.routing` (registry of routing policies) · :mod:`.gating` (registry of gate constructions) ·
:mod:`.moe` (the MoE layer and the one factory that makes it from a site and a config) ·
:mod:`.build` · :mod:`.io` (segmoe's folder format, atomic) · :mod:`.pipeline` (``SegMoEPipeline``) ·
:mod:`.estimate`, :mod:`.offload`, :mod:`.kvcache` (memory and speed).
"""
