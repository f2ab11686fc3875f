"""CALM: continuous autoregressive language models (next-vector prediction with an energy head).

`Autoencoder` (K tokens ↔ one latent), `CALM` (Llama backbone + `EnergyHead`, `energy_loss`),
likelihood-free temperature samplers and `calm_generate`, and the training recipes. BrierLM lives in
`celeris.metrics`.
"""

from celeris.calm.autoencoder import Autoencoder, AutoencoderConfig
from celeris.calm.model import CALM, CALMConfig, EnergyHead, energy_loss
from celeris.calm.sampling import batch_temperature_sample, calm_generate, exact_temperature_sample

__all__ = ["CALM", "Autoencoder", "AutoencoderConfig", "CALMConfig", "EnergyHead", "batch_temperature_sample",
           "calm_generate", "energy_loss", "exact_temperature_sample"]

from celeris.calm.artifacts import register_aliases as _register_aliases

_register_aliases()
