"""SFT data selection (docs/METHOD.md §3): training sets drawn from mastery categories, balanced
across the in-domain relations, written in TRL's prompt-completion format (``select.sets``)."""
