"""Celeris: make language models cheaper to train and faster to run.

Python API (the CLI's commands under the same names):
    load_model, generate, train_lm, demo, info, load_corpus, data_stats, Trainer, TrainConfig
"""

from celeris import noise as _noise  # noqa: E402
from celeris.version import __version__  # noqa: E402, F401

_QUIET = _noise.running_as_cli() and _noise.silence_third_party()  # before torch & co. are imported: their
# import warnings are not the user's business

from celeris.api import generate  # noqa: E402
from celeris.corpora import Corpus, Document, load_corpus  # noqa: E402
from celeris.corpora import corpus_stats as data_stats  # noqa: E402
from celeris.demo import demo  # noqa: E402
from celeris.errors import CelerisError  # noqa: E402
from celeris.generation import GenerationResult  # noqa: E402
from celeris.info import info  # noqa: E402
from celeris.lm import train_lm, train_tokenizer  # noqa: E402
from celeris.models import load_model, load_tokenizer, new_model  # noqa: E402
from celeris.trainer import TrainConfig, Trainer, TrainResult  # noqa: E402

if _QUIET:
    _noise.quiet_torch_logs()

__all__ = [
    "CelerisError", "Corpus", "Document", "GenerationResult", "TrainConfig", "TrainResult", "Trainer",
    "data_stats", "demo", "generate", "info", "load_corpus", "load_model", "load_tokenizer", "new_model",
    "train_lm", "train_tokenizer",
]
