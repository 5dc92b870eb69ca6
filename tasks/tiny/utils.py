"""lm-eval hooks of this task family (written by `sftknow-eval tasks write`)."""

from pathlib import Path

from sftknow_eval.lm_tasks import scoring

FOLDER = Path(__file__).resolve().parent


def load_bucket(**kwargs):
    return scoring.load_bucket(FOLDER, **kwargs)


doc_to_text = scoring.doc_to_text
doc_to_target = scoring.doc_to_target
process_results = scoring.process_results
