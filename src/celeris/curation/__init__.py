"""Data-centric training: curate a corpus (dedup, quality rules, decontamination), augment it,
transfer from a pretrained model, and measure in FLOPs what that buys (`celeris bench data`)."""

from celeris.curation.augment import augment_code, augment_documents, augment_prose
from celeris.curation.bench import DataBenchConfig, bench_data
from celeris.curation.corpora import package_docs_corpus, resolve_corpus
from celeris.curation.pipeline import RULES, CurationConfig, CurationResult, curate, curate_documents
from celeris.curation.transfer import lora_model, transfer_vs_scratch

__all__ = ["RULES", "CurationConfig", "CurationResult", "DataBenchConfig", "augment_code", "augment_documents",
           "augment_prose", "bench_data", "curate", "curate_documents", "lora_model", "package_docs_corpus",
           "resolve_corpus", "transfer_vs_scratch"]
