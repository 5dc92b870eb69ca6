"""The study: one spec runs probe -> select -> train -> evaluate -> KL -> restore -> evaluate ->
report through the stage modules, with caching, resume and shards (``sftknow-eval study``)."""

from sftknow_eval.study.plan import Cell, plan
from sftknow_eval.study.runner import StudyRun, run_study
from sftknow_eval.study.spec import StudySpec, load_spec, spec_from_dict

__all__ = ["Cell", "StudyRun", "StudySpec", "load_spec", "plan", "run_study", "spec_from_dict"]
